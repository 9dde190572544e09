"""Admission control: estimate a request's TTFT on the worker chosen for it, and refuse
it early when its priority class should not wait that long.

The estimate (per worker, from what this router itself saw; no I/O, no clock of its
own): TTFT ≈ `s_per_token` × (prompt tokens ahead of the request + its own uncached
tokens). Ahead are the prompt tokens this router has in flight there without a first
token yet *of the request's class or a higher one*: the worker's waiting queue orders
high > normal > low, so a high-priority request waits for high ones only, and a
queue of low-priority prompts does not make a normal request look late.
`s_per_token` is a moving average over the worker's recent first tokens of TTFT /
(the tokens that were ahead of the request + its own), so it absorbs the worker's
prefill speed and what decoding costs it meanwhile. While a request waits, work of
higher classes keeps arriving and goes first: with `busy` the share of the worker's
time that this router's higher-class arrivals take (their prompt tokens per second,
a moving rate over ~RATE_TAU_S, × `s_per_token`), the wait stretches to
estimate / (1 − busy), as in a priority queue; a worker that higher classes keep
busy (`busy` ≥ MAX_BUSY) has no room for the class at all (estimate MAX_ESTIMATE_S).
Without this, a normal request admitted during a burst of high-priority traffic
would starve past its SLO. A worker with no sample yet has no estimate: everything
is admitted until one exists. Callers pass the time (`now`, monotonic seconds).

The rule: a request whose class has a threshold in `reject_above_s` (defaults: low
2 s, normal 8 s; high 0, none) is refused with RESOURCE_EXHAUSTED when the estimate
exceeds it; HTTP clients get 429 with `Retry-After`. Besides, at most
`max_in_flight` requests are open through this router at once (bounded queues).
Graceful degradation: above `degrade_above_s` of its class (default: low, 1 s) a
request's `max_tokens` is capped at `degraded_max_tokens`; it then ends with
finish_reason "length" and the HTTP response carries `x-splitserve-degraded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config.router import QosConfig
from splitserve.router.openai_api import PRIORITIES  # the order of the workers' queues

EMA_WEIGHT = 0.2  # of the newest sample
RATE_TAU_S = 5.0  # time constant of the arrival rates: a 20 s load step is seen in ~5 s
MAX_BUSY = 0.95
MAX_ESTIMATE_S = 3600.0


def _rank(priority: str) -> int:
    return PRIORITIES.index(priority) if priority in PRIORITIES else 1  # "": normal


@dataclass
class TtftModel:
    """One worker's queue as this router sees it."""

    pending: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))  # by class
    s_per_token: float | None = None  # moving average; None until the first sample
    # prompt tokens a second sent there, by class, decaying with RATE_TAU_S, as of rate_at
    rates: list[float] = field(default_factory=lambda: [0.0] * len(PRIORITIES))
    rate_at: float = 0.0

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens sent there with no first token back yet, every class."""
        return sum(self.pending)

    def ahead(self, priority: str) -> int:
        """Pending tokens a request of `priority` waits for: its class and higher ones."""
        return sum(self.pending[:_rank(priority) + 1])

    def busy(self, priority: str, now: float) -> float:
        """The share of the worker's time that arrivals of higher classes take."""
        if self.s_per_token is None:
            return 0.0
        return self.s_per_token * self._decay(now) * sum(self.rates[:_rank(priority)])

    def estimate_s(self, uncached_tokens: int, priority: str = "normal",
                   now: float = 0.0) -> float | None:
        if self.s_per_token is None:
            return None
        busy = self.busy(priority, now)
        if busy >= MAX_BUSY:
            return MAX_ESTIMATE_S
        own = self.s_per_token * (self.ahead(priority) + uncached_tokens)
        return min(MAX_ESTIMATE_S, own / (1.0 - busy))

    def sent(self, tokens: int, priority: str = "normal", now: float = 0.0) -> int:
        """A request with `tokens` uncached tokens went out; returns the tokens ahead."""
        ahead = self.ahead(priority)
        rank = _rank(priority)
        self.pending[rank] += tokens
        decay = self._decay(now)
        self.rates = [r * decay for r in self.rates]
        self.rates[rank] += tokens / RATE_TAU_S
        self.rate_at = max(self.rate_at, now)
        return ahead

    def first_token(self, tokens: int, ahead: int, ttft_s: float,
                    priority: str = "normal") -> None:
        self._settle(tokens, priority)
        sample = ttft_s / max(1, ahead + tokens)
        self.s_per_token = sample if self.s_per_token is None else (
            (1 - EMA_WEIGHT) * self.s_per_token + EMA_WEIGHT * sample)

    def gave_up(self, tokens: int, priority: str = "normal") -> None:
        """Ended (error, cancel) before its first token."""
        self._settle(tokens, priority)

    def _decay(self, now: float) -> float:
        """How much of the rates as of `rate_at` is left at `now`."""
        return math.exp(-max(0.0, now - self.rate_at) / RATE_TAU_S)

    def _settle(self, tokens: int, priority: str) -> None:
        rank = _rank(priority)
        self.pending[rank] = max(0, self.pending[rank] - tokens)


def refusal(config: QosConfig, priority: str, estimate_s: float | None) -> str | None:
    """Why a request of `priority` with this TTFT estimate is refused, or None."""
    if not config.admission or estimate_s is None:
        return None
    limit = config.reject_above_s.get(priority)
    if not limit or estimate_s <= limit:
        return None
    return (f"overloaded: estimated time to first token {estimate_s:.1f} s exceeds "
            f"{limit:g} s for priority {priority or 'normal'}; retry later")


DEFAULT_MAX_TOKENS = 64  # the workers' default when a request names none (generation.proto)


def degraded_max_tokens(config: QosConfig, priority: str, estimate_s: float | None,
                        max_tokens: int | None) -> int | None:
    """The lower `max_tokens` a request of `priority` gets under this much load, or None
    when it keeps its own."""
    if not config.admission or estimate_s is None:
        return None
    limit = config.degrade_above_s.get(priority)
    if not limit or estimate_s <= limit:
        return None
    own = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return config.degraded_max_tokens if own > config.degraded_max_tokens else None
