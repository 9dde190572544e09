"""A/B of the engine's output tok/s: the working tree against a git revision, in one process.

Single runs of `engine_throughput.py` vary by ±15% between processes on a shared 2-core
box, so a change is measured here against its base in the same process: the base
revision's `src/splitserve` is exported into a temporary directory as the package
`splitserve_base` (imports rewritten), and both engines run the same workload
(`engine_throughput.py`'s: trace requests, greedy, EOS ignored) in alternating rounds,
ABAB..., for each dtype. Each side loads its own model through its own loader.

    python benchmarks/engine_ab.py --base HEAD --dtypes float32,bfloat16 --rounds 2
    python benchmarks/engine_ab.py --base worktree --set splitserve.some.module.CONSTANT=0

Prints one JSON object: per dtype, each side's tok/s per round, the medians, and the
ratio new/base of the medians; the same per CPU-second of the process, which other
processes' load does not inflate (with `--threads 1` the engine's own work).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import TRACE, load_workload

REPO = Path(__file__).resolve().parents[1]


def export_base(rev: str, into: Path) -> None:
    """`src/splitserve` at `rev` (or as it is now: "worktree") as the package
    `splitserve_base` under `into`."""
    pkg = into / "splitserve_base"
    if rev == "worktree":
        shutil.copytree(REPO / "src" / "splitserve", pkg,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src/splitserve"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
        (into / "src" / "splitserve").rename(pkg)
    pattern = re.compile(r"\bsplitserve\.")
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        text = pattern.sub("splitserve_base.", text)
        text = re.sub(r"^(\s*)from splitserve import", r"\1from splitserve_base import",
                      text, flags=re.MULTILINE)
        path.write_text(text)


def apply_settings(settings: list[str]) -> None:
    """`module.attr=value` (a Python literal) on the new side only, e.g.
    `splitserve.model.packed_linear.FP32_PLAIN_MAX_ROWS=0`."""
    for setting in settings:
        target, _, value = setting.partition("=")
        module, _, attr = target.rpartition(".")
        setattr(importlib.import_module(module), attr, ast.literal_eval(value))


def make_engine(pkg: str, dtype: str, batch_size: int):  # type: ignore[no-untyped-def]
    schema = importlib.import_module(f"{pkg}.config.schema")
    engine_mod = importlib.import_module(f"{pkg}.engine.llm_engine")
    loader = importlib.import_module(f"{pkg}.model.loader")
    kv_pool: ModuleType = importlib.import_module(f"{pkg}.engine.kv_pool")
    loaded = loader.load_model(dtype=kv_pool.dtype_from_name(dtype))
    # a base without kv_prefault faults its pool in during the run (as it did then)
    prefault = ({"kv_prefault": "sync"} if "kv_prefault" in {
        f.name for f in dataclasses.fields(schema.EngineConfig)} else {})
    config = schema.EngineConfig(max_num_seqs=batch_size, kv_cache_memory_mb=2048,
                                 enable_prefix_cache=False, dtype=dtype, **prefault)
    return engine_mod.Engine(loaded, config), importlib.import_module(f"{pkg}.engine.sampling")


def run_once(engine, sampling, work):  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of the process, outputs)."""
    params = [sampling.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for _, n in work]
    engine.generate([work[0][0]], params[0])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    outputs = engine.generate([p for p, _ in work], params)
    return time.perf_counter() - t0, time.process_time() - c0, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="HEAD",
                    help="git revision to compare against, or 'worktree' (with --set)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.ATTR=VALUE",
                    help="override a module constant on the new side (repeatable)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory(prefix="engine_ab_")
    export_base(args.base, Path(tmp.name))
    sys.path.insert(0, tmp.name)
    apply_settings(args.set)
    result: dict = {"benchmark": "engine_ab", "base": args.base, "set": args.set,
                    "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                "threads": args.threads, "torch": torch.__version__},
                    "workload": {"num_requests": args.num_requests,
                                 "batch_size": args.batch_size}}
    for dtype in args.dtypes.split(","):
        sides = {"base": make_engine("splitserve_base", dtype, args.batch_size),
                 "new": make_engine("splitserve", dtype, args.batch_size)}
        vocab = sides["new"][0].loaded.config.vocab_size
        work = load_workload(TRACE, args.num_requests, vocab, args.seed)
        num_out = sum(n for _, n in work)
        rates: dict[str, list[float]] = {"base": [], "new": []}
        cpu_rates: dict[str, list[float]] = {"base": [], "new": []}
        outputs: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
            for side in order:
                seconds, cpu_s, outputs[side] = run_once(*sides[side], work)
                rates[side].append(round(num_out / seconds, 1))
                cpu_rates[side].append(round(num_out / cpu_s, 1))
                print(f"{dtype} round {r} {side}: {rates[side][-1]} tok/s, "
                      f"{cpu_rates[side][-1]} tok per CPU-s", file=sys.stderr)
        same = sum(a == b for a, b in zip(outputs["base"], outputs["new"]))
        medians = {k: statistics.median(v) for k, v in rates.items()}
        cpu_medians = {k: statistics.median(v) for k, v in cpu_rates.items()}
        # With other processes on the box, wall time counts their slices too; tokens per
        # CPU-second of this process does not (with 1 thread it is the engine's own work).
        result[dtype] = {"tok_s": rates, "median": medians,
                         "ratio_new_vs_base": round(medians["new"] / medians["base"], 3),
                         "tok_per_cpu_s": cpu_rates,
                         "cpu_ratio_new_vs_base": round(cpu_medians["new"] / cpu_medians["base"],
                                                        3),
                         "identical_outputs": f"{same}/{len(work)}"}
        del sides
    print(json.dumps(result))


if __name__ == "__main__":
    main()
