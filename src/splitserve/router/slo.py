"""Whether a request met its priority class's SLOs, timed where the router passes its
chunks on to the client.

A request's TTFT runs from its arrival at the router to its first chunk with tokens;
its TPOT is the mean time per output token after those of the first chunk (the time
from that chunk to the last, over the tokens that came after it), the definition vLLM
and the planner use. A request that completed (finish reason stop or length) is judged
against `qos.ttft_slo_s` and `qos.tpot_slo_s` of its class (0: no promise): met, or
which one it missed, TTFT first. Requests refused, failed, aborted or cancelled are not
judged here; the router's `requests_total` counts them. Goodput, the requests meeting
their SLOs a second, is then the rate of `slo_requests_total{outcome="met"}`.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field

from splitserve.config.router import QosConfig
from splitserve.priority import PRIORITIES, class_rank


class SloOutcome(enum.Enum):
    MET = "met"
    TTFT_MISSED = "ttft_missed"
    TPOT_MISSED = "tpot_missed"


@dataclass(frozen=True)
class Judged:
    outcome: SloOutcome
    ttft_s: float
    tpot_s: float | None  # None: no token after the first chunk's


def judge(qos: QosConfig, priority: str, ttft_s: float, tpot_s: float | None) -> SloOutcome:
    ttft_slo, tpot_slo = qos.ttft_slo_s.get(priority), qos.tpot_slo_s.get(priority)
    if ttft_slo and ttft_s > ttft_slo:
        return SloOutcome.TTFT_MISSED
    if tpot_slo and tpot_s is not None and tpot_s > tpot_slo:
        return SloOutcome.TPOT_MISSED
    return SloOutcome.MET


@dataclass
class SloClock:
    """One request's timeline through the router (monotonic seconds)."""

    arrived_s: float
    first_s: float | None = None
    last_s: float = 0.0
    first_tokens: int = 0
    tokens: int = 0

    def chunk(self, num_tokens: int, now: float) -> float | None:
        """Count a chunk; the request's TTFT when it brought the first tokens, else None."""
        if not num_tokens:
            return None
        ttft_s = None
        if self.first_s is None:
            self.first_s, self.first_tokens = now, num_tokens
            ttft_s = now - self.arrived_s
        self.tokens += num_tokens
        self.last_s = now
        return ttft_s

    def judged(self, qos: QosConfig, priority: str) -> Judged | None:
        """The verdict once the request completed; None when no token came."""
        if self.first_s is None:
            return None
        ttft_s = self.first_s - self.arrived_s
        after = self.tokens - self.first_tokens
        tpot_s = (self.last_s - self.first_s) / after if after else None
        return Judged(judge(qos, priority, ttft_s, tpot_s), ttft_s, tpot_s)


@dataclass
class SloCounters:
    """Judged requests by (class, outcome); a class outside PRIORITIES counts as the
    default one, as the queues treat it."""

    counts: Counter[tuple[str, SloOutcome]] = field(default_factory=Counter)

    def add(self, priority: str, outcome: SloOutcome) -> None:
        self.counts[(PRIORITIES[class_rank(priority)], outcome)] += 1

    def rows(self) -> list[tuple[str, SloOutcome, int]]:
        """Every (class, outcome) with its count, zeros included (a scrape sees each
        series from the start)."""
        return [(p, o, self.counts[(p, o)]) for p in PRIORITIES for o in SloOutcome]
