"""Engine start-up: seconds from a fresh process to an engine that has produced a token.

This is what adding a worker costs the planner (ARCHITECTURE.md: scale in seconds).
Each run is a fresh `python` process that imports splitserve, builds the engine from
the embedded default model (the converted-weights cache is warmed once before the
clock) and generates one token. Variants, alternated run by run so that a noisy box
hits all of them alike:

- `thp_on`: the default (`THP_MEM_ALLOC_ENABLE=1`: weights in transparent huge pages).
- `thp_off`: `THP_MEM_ALLOC_ENABLE=0`, the baseline for what huge pages cost at start.
- `dynamo_imported`: the default plus `import torch._dynamo` first. Building the model
  on the meta device (before this benchmark existed) ran torch's Python meta kernels,
  which import it; this variant puts that cost back, as the baseline for its removal.

One JSON object with `--json`: per variant the median and max of each phase, and the
ratios of the medians of `to_first_token_s` to `thp_on`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import json, sys, time
t0 = time.perf_counter()
if sys.argv[1] == "dynamo_imported":
    import torch._dynamo
from splitserve.config.schema import EngineConfig
from splitserve.engine.llm_engine import Engine
from splitserve.engine.sampling import SamplingParams
t1 = time.perf_counter()
engine = Engine.from_config(EngineConfig())
t2 = time.perf_counter()
engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1, temperature=0))
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1, "first_token_s": t3 - t2}))
"""

VARIANTS = {"thp_on": "1", "thp_off": "0", "dynamo_imported": "1"}


def run_once(variant: str) -> dict[str, float]:
    env = dict(os.environ, THP_MEM_ALLOC_ENABLE=VARIANTS[variant])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, variant], env=env, check=True,
                         capture_output=True, text=True).stdout
    wall = time.perf_counter() - t0
    phases: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    # the interpreter's own start is outside the child's clock
    phases["to_first_token_s"] = wall
    return phases


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {phase: {"median": round(statistics.median(r[phase] for r in runs), 3),
                    "max": round(max(r[phase] for r in runs), 3)} for phase in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run_once("thp_off")  # converts the weights into the cache if it has no entry yet
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.runs):
        for variant in VARIANTS:
            runs[variant].append(run_once(variant))
    result: dict[str, object] = {"benchmark": "startup", "runs_per_variant": args.runs}
    result.update({v: summarize(r) for v, r in runs.items()})
    base = statistics.median(r["to_first_token_s"] for r in runs["thp_on"])
    result["ratio_to_thp_on"] = {
        v: round(statistics.median(r["to_first_token_s"] for r in rs) / base, 3)
        for v, rs in runs.items() if v != "thp_on"}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
