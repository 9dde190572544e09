"""Sliding windows over what a worker measured recently: the body of `WorkerStats`.

Every `stats_interval_s` a worker publishes the last `WINDOW_S` seconds of:
- TTFT, inter-token latency, TPOT (per finished request) and queue wait percentiles,
  output tokens/s;
- the prefill rate as a function of prompt length (tokens/s per length bucket:
  local prefills on a decode worker, jobs on a prefill worker), which leases and the
  planner size work by;
- the decode step time as a function of batch size (pure decode steps only, with
  the mean context they attended to);
- the KV transfer rate (prefill workers).
Windows are bounded in time and in count (`MAX_SAMPLES`), so memory is bounded
whatever the load. All of it lives on the event loop; nothing here is thread-safe.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from splitserve.engine.stats import EngineStats

WINDOW_S = 60.0
MAX_SAMPLES = 4096
PREFILL_LENGTH_EDGES = (128, 512, 2048, 8192)  # bucket i: [edge i-1, edge i) tokens
BATCH_EDGES = (2, 4, 8, 16, 32)  # bucket i: [edge i-1, edge i) sequences


class SlidingWindow:
    """(time, value...) samples of the last `span_s` seconds, at most `max_samples`."""

    def __init__(self, span_s: float = WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.span_s = span_s
        self._samples: deque[tuple[float, tuple[float, ...]]] = deque(maxlen=max_samples)

    def add(self, now: float, *values: float) -> None:
        self._samples.append((now, values))

    def values(self, now: float) -> list[tuple[float, ...]]:
        while self._samples and self._samples[0][0] < now - self.span_s:
            self._samples.popleft()
        return [v for _, v in self._samples]

    def first(self, now: float) -> list[float]:
        return [v[0] for v in self.values(now)]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class RateBucket:
    """Prefill throughput of prompts in [min_tokens, max_tokens) (max 0: no bound)."""

    min_tokens: int
    max_tokens: int
    tokens_per_s: float
    num_samples: int


@dataclass(frozen=True)
class StepBucket:
    """Mean time of pure decode steps with [min_batch, max_batch) sequences."""

    min_batch: int
    max_batch: int
    mean_ms: float
    mean_context_tokens: float
    num_samples: int


@dataclass(frozen=True)
class WindowSummary:
    """The windows at one moment (what `WorkerStats` carries)."""

    window_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    queue_p50_ms: float
    queue_p99_ms: float
    prefill_rates: tuple[RateBucket, ...]
    decode_steps: tuple[StepBucket, ...]
    transfer_bytes_per_s: float
    prefill_tokens_per_s: float = 0.0  # load: prompt tokens prefilled / window
    prefill_rate_tokens_per_s: float = 0.0  # speed: / seconds spent prefilling
    mean_prefill_tokens: float = 0.0
    tpot_p99_ms: float = 0.0  # per finished request: mean time per token after the first


def _bounds(edges: Sequence[int], i: int) -> tuple[int, int]:
    return (edges[i - 1] if i else 0), (edges[i] if i < len(edges) else 0)


class WorkerWindows:
    def __init__(self, span_s: float = WINDOW_S) -> None:
        self.span_s = span_s
        self.ttft = SlidingWindow(span_s)  # seconds
        self.itl = SlidingWindow(span_s)  # seconds
        self.tpot = SlidingWindow(span_s)  # seconds, one per finished request
        self.queue = SlidingWindow(span_s)  # seconds
        self.output_tokens = SlidingWindow(span_s)  # tokens per chunk
        self.prefills = [SlidingWindow(span_s) for _ in range(len(PREFILL_LENGTH_EDGES) + 1)]
        self.steps = [SlidingWindow(span_s) for _ in range(len(BATCH_EDGES) + 1)]
        self.transfers = SlidingWindow(span_s)  # (bytes, seconds)
        self._last_step_seen = -1  # EngineStats.num_steps of the last step counted

    # --- observations ------------------------------------------------------------
    def prefill(self, now: float, num_tokens: int, duration_s: float) -> None:
        """A prompt of `num_tokens` uncached tokens took `duration_s` to prefill."""
        if num_tokens > 0 and duration_s > 0:
            i = bisect.bisect_right(PREFILL_LENGTH_EDGES, num_tokens)
            self.prefills[i].add(now, num_tokens, duration_s)

    def step(self, stats: EngineStats) -> None:
        """An engine snapshot: its last step counts once (each command's answer carries
        the latest step again, mid-step ones the one before) if it was pure decode."""
        if stats.num_steps == self._last_step_seen:
            return
        self._last_step_seen = stats.num_steps
        step = stats.last_step
        if step.num_decode_tokens and not step.num_prefill_tokens and step.duration_s > 0:
            i = bisect.bisect_right(BATCH_EDGES, step.num_decode_tokens)
            self.steps[i].add(stats.taken_s, step.duration_s,
                              step.num_context_tokens / step.num_decode_tokens)

    def transfer(self, now: float, num_bytes: int, duration_s: float) -> None:
        self.transfers.add(now, num_bytes, duration_s)

    def prefill_rate(self, now: float, num_tokens: int) -> float | None:
        """Measured tokens/s of prompts in `num_tokens`' length bucket (None: none)."""
        samples = self.prefills[bisect.bisect_right(PREFILL_LENGTH_EDGES, num_tokens)].values(now)
        return _rate(samples)

    # --- the summary -------------------------------------------------------------
    def summary(self, now: float) -> WindowSummary:
        ttft, itl, queue = self.ttft.first(now), self.itl.first(now), self.queue.first(now)
        rates, prefilled = [], []
        for i, window in enumerate(self.prefills):
            samples = window.values(now)
            prefilled.extend(samples)
            rate = _rate(samples)
            if rate is not None:
                lo, hi = _bounds(PREFILL_LENGTH_EDGES, i)
                rates.append(RateBucket(lo, hi, rate, len(samples)))
        steps = []
        for i, window in enumerate(self.steps):
            samples = window.values(now)
            if samples:
                lo, hi = _bounds(BATCH_EDGES, i)
                steps.append(StepBucket(max(lo, 1), hi, 1e3 * _mean(s[0] for s in samples),
                                        _mean(s[1] for s in samples), len(samples)))
        moved = self.transfers.values(now)
        busy_s = sum(s[1] for s in moved)
        return WindowSummary(
            window_s=self.span_s,
            tokens_per_s=sum(self.output_tokens.first(now)) / self.span_s,
            ttft_p50_ms=1e3 * percentile(ttft, 0.5), ttft_p99_ms=1e3 * percentile(ttft, 0.99),
            itl_p50_ms=1e3 * percentile(itl, 0.5), itl_p99_ms=1e3 * percentile(itl, 0.99),
            queue_p50_ms=1e3 * percentile(queue, 0.5),
            queue_p99_ms=1e3 * percentile(queue, 0.99),
            prefill_rates=tuple(rates), decode_steps=tuple(steps),
            transfer_bytes_per_s=sum(s[0] for s in moved) / busy_s if busy_s else 0.0,
            prefill_tokens_per_s=sum(s[0] for s in prefilled) / self.span_s,
            prefill_rate_tokens_per_s=_rate(prefilled) or 0.0,
            mean_prefill_tokens=_mean(s[0] for s in prefilled),
            tpot_p99_ms=1e3 * percentile(self.tpot.first(now), 0.99))


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def _rate(samples: Sequence[tuple[float, ...]]) -> float | None:
    """Tokens per second over (tokens, seconds) samples."""
    secs = sum(s[1] for s in samples)
    return sum(s[0] for s in samples) / secs if secs > 0 else None
