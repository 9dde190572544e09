"""Where the roles report what happened to a request or a job, once: each event goes
to the Prometheus histograms (worker/metrics.py) and to the sliding windows that
`WorkerStats` publishes (worker/windows.py). Runs on the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass

from splitserve.engine.stats import EngineStats
from splitserve.worker.metrics import RequestMetrics
from splitserve.worker.windows import WorkerWindows


@dataclass(frozen=True)
class FirstToken:
    """How a request got its first token (all times on time.monotonic())."""

    start_s: float  # admitted (after validation)
    at_s: float  # the first token arrived
    queue_s: float  # admission to the start of its prefill
    prefill_s: float  # start of prefill to the first token
    path: str  # "local" or "remote"
    num_prefill_tokens: int  # uncached prompt tokens prefilled


class Observer:
    def __init__(self, metrics: RequestMetrics, windows: WorkerWindows) -> None:
        self.metrics = metrics
        self.windows = windows

    def first_token(self, first: FirstToken, num_tokens: int) -> None:
        now, ttft_s = first.at_s, first.at_s - first.start_s
        self.metrics.ttft.observe(ttft_s)
        self.metrics.queue.observe(first.queue_s)
        self.metrics.prefill_time(first.path).observe(first.prefill_s)
        self.windows.ttft.add(now, ttft_s)
        self.windows.queue.add(now, first.queue_s)
        self.windows.output_tokens.add(now, num_tokens)
        if first.path == "local":  # a remote one is measured by the prefill worker
            self.windows.prefill(now, first.num_prefill_tokens, first.prefill_s)

    def tokens(self, now: float, gap_s: float, num_tokens: int) -> None:
        """A chunk after the first: `gap_s` since the previous one."""
        if num_tokens <= 0:
            return
        per_token_s = gap_s / num_tokens
        for _ in range(num_tokens):
            self.metrics.itl.observe(per_token_s)
        self.windows.itl.add(now, per_token_s)
        self.windows.output_tokens.add(now, num_tokens)

    def finished(self, now: float, first: FirstToken, reason: str, num_prompt_tokens: int,
                 num_output_tokens: int) -> None:
        self.metrics.e2e.observe(now - first.start_s)
        self.metrics.finished(reason, num_prompt_tokens, num_output_tokens)
        if num_output_tokens > 1:  # TPOT: the request's mean time per token after the first
            self.windows.tpot.add(now, (now - first.at_s) / (num_output_tokens - 1))

    def job_prefilled(self, num_tokens: int, duration_s: float) -> None:
        """Prefill worker: a job's prompt (uncached part) took `duration_s`."""
        self.windows.prefill(time.monotonic(), num_tokens, duration_s)
        self.metrics.prefill_time("job").observe(duration_s)

    def transfer(self, num_bytes: int, duration_s: float) -> None:
        self.metrics.transfer_bytes.observe(num_bytes)
        self.metrics.transfer_time.observe(duration_s)
        self.windows.transfer(time.monotonic(), num_bytes, duration_s)

    def engine_step(self, stats: EngineStats) -> None:
        """An `AsyncEngine` stats listener."""
        self.windows.step(stats)
