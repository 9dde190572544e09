"""`splitserve profile --out FILE`: measure the real engine in this process and write the
simulator's cost model (planner/profile.py).

What is measured, with the engine config given (default: embedded SmolLM2, the default
EngineConfig) and `threads` torch threads (1 by default, as a worker pinned to a core):
1. start-up: `Engine.from_config` (weights loaded, KV pool allocated) → startup_*_s;
2. prefill: one prompt of each length alone (random token ids, so the prefix cache
   never serves it; `max_tokens` 1), timed over the engine steps that prefill it
   (chunked as in service), median of `repeats`;
3. decode steps: `batch` sequences of `context` prompt tokens prefilled, then the next
   `num_steps` decode steps timed (`StepStats.duration_s`), median per (batch, context);
   a least-squares fit of `base + per_seq·batch + per_ctx·batch·context`.
KV bytes per token and the engine limits come from the engine itself; transfer rate,
remote and queue overheads and the role flip are not measured here (they need a
cluster: `splitserve calibrate`) and keep the profile defaults.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitserve.config.schema import EngineConfig
from splitserve.planner.profile import Profile, profile_to_dict
from splitserve.priority import DEFAULT_PRIORITY

log = logging.getLogger(__name__)

PREFILL_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048)
DECODE_POINTS = ((1, 64), (8, 64), (32, 64), (64, 64), (1, 512), (8, 512), (16, 512),
                 (4, 1024), (8, 1024))  # batch x context within the ~11.6k-token KV pool


@dataclass(frozen=True)
class MeasureSettings:
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    threads: int = 1
    repeats: int = 3
    num_steps: int = 8
    prefill_lengths: tuple[int, ...] = PREFILL_LENGTHS
    decode_points: tuple[tuple[int, int], ...] = DECODE_POINTS
    seed: int = 0


def measure(settings: MeasureSettings) -> tuple[Profile, dict[str, object]]:
    """The measured profile and the raw medians (for the file's header)."""
    import torch

    from splitserve.engine.llm_engine import Engine

    torch.set_num_threads(settings.threads)
    rng = random.Random(settings.seed)
    started = time.perf_counter()
    engine = Engine.from_config(settings.engine)
    startup_s = time.perf_counter() - started
    vocab = engine.info.vocab_size
    prefill = {n: statistics.median([_prefill_ms(engine, _tokens(rng, n, vocab))
                                     for _ in range(settings.repeats)])
               for n in settings.prefill_lengths}
    log.info("prefill medians (ms): %s", prefill)
    decode: dict[tuple[int, int], float] = {}
    for batch, context in settings.decode_points:
        decode[(batch, context)] = _decode_step_ms(engine, rng, vocab, batch, context,
                                                   settings.num_steps * settings.repeats)
        log.info("decode step batch %d context %d: %.1f ms", batch, context,
                 decode[(batch, context)])
    base, per_seq, per_ctx = _fit_decode(decode)
    info = engine.info
    profile = Profile(
        name=f"{info.fingerprint} {info.dtype}, {settings.threads} thread(s)",
        prefill_tokens=tuple(float(n) for n in prefill),
        prefill_ms_points=tuple(round(v, 2) for v in prefill.values()),
        decode_base_ms=round(base, 3), decode_ms_per_seq=round(per_seq, 4),
        decode_ms_per_context_token=round(per_ctx, 6),
        kv_bytes_per_token=info.page_nbytes // info.page_size,
        startup_prefill_s=round(startup_s, 2), startup_decode_s=round(startup_s, 2),
        max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=settings.engine.max_num_batched_tokens,
        max_prefill_chunk_tokens=(settings.engine.max_prefill_chunk_tokens
                                  or settings.engine.max_num_batched_tokens),
        kv_capacity_tokens=info.num_pages * info.page_size,
        tpot_slo_ms=1e3 * settings.engine.tpot_slo_s.get(DEFAULT_PRIORITY))
    raw: dict[str, object] = {
        "prefill_ms": {str(k): round(v, 2) for k, v in prefill.items()},
        "decode_step_ms": {f"{b}x{c}": round(v, 2) for (b, c), v in decode.items()},
        "startup_s": round(startup_s, 2)}
    return profile, raw


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(256, vocab) for _ in range(n)]


def _prefill_ms(engine: object, prompt: list[int]) -> float:
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams

    assert isinstance(engine, Engine)
    engine.add_request(f"profile-prefill-{id(prompt)}-{time.monotonic_ns()}", prompt,
                       SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    started = time.perf_counter()
    while engine.has_unfinished:
        engine.step()
    return 1e3 * (time.perf_counter() - started)


def _decode_step_ms(engine: object, rng: random.Random, vocab: int, batch: int,
                    context: int, num_steps: int) -> float:
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams

    assert isinstance(engine, Engine)
    # the first prompts decode while the last are still prefilled (chunked at the step
    # budget): enough tokens that all `batch` then decode together for num_steps steps
    budget = engine.config.max_num_batched_tokens
    params = SamplingParams(max_tokens=num_steps + 2 + batch + -(-batch * context // budget),
                            temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-decode-{batch}-{context}-{i}-{time.monotonic_ns()}",
                           _tokens(rng, context, vocab), params)
    durations: list[float] = []
    while engine.has_unfinished:
        engine.step()
        step = engine.last_step
        if step.num_prefill_tokens == 0 and step.num_decode_tokens == batch:
            durations.append(1e3 * step.duration_s)
    if not durations:
        raise RuntimeError(f"no decode step with all {batch} sequences of {context} tokens")
    return statistics.median(durations[:num_steps])


def _fit_decode(points: dict[tuple[int, int], float]) -> tuple[float, float, float]:
    """Least squares of step_ms = base + per_seq·batch + per_ctx·batch·context, each
    coefficient kept >= 0 (a negative one would make a bigger batch faster)."""
    rows = np.array([[1.0, b, b * c] for b, c in points], dtype=np.float64)
    ys = np.array(list(points.values()), dtype=np.float64)
    coef, *_ = np.linalg.lstsq(rows, ys, rcond=None)
    if (coef < 0).any():  # refit without the negative terms
        keep = coef >= 0
        sub, *_ = np.linalg.lstsq(rows[:, keep], ys, rcond=None)
        coef = np.zeros(3)
        coef[keep] = np.maximum(sub, 0.0)
    return float(coef[0]), float(coef[1]), float(coef[2])


def write_profile(profile: Profile, raw: dict[str, object], path: Path,
                  settings: MeasureSettings, machine: str) -> None:
    import yaml

    header = [
        "# Simulator cost model (splitserve simulate --profile), written by",
        "# `splitserve profile --out FILE` (src/splitserve/planner/measure.py).",
        (f"# Measured in-process with torch.set_num_threads({settings.threads}) (one "
         "worker pinned to a core),"),
        f"# on {machine}, default EngineConfig, medians of {settings.repeats} repeats.",
        "# Not measured here (defaults, see planner/profile.py): transfer_bytes_per_s,",
        "# remote_overhead_ms, queue_overhead_ms, role_flip_s.",
        f"# Raw medians: {raw}",
    ]
    body = yaml.safe_dump(profile_to_dict(profile), sort_keys=False, width=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header) + "\n" + body)


def describe_machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
