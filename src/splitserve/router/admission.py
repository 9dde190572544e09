"""Admission control: estimate a request's TTFT on the worker chosen for it, and refuse
it early when its priority class should not wait that long.

The estimate (per worker, from what this router itself saw; no I/O, no clock of its
own) is a line over the tokens of work the request's first token needs: TTFT ≈
`base_s` + `s_per_token` × (prompt tokens ahead of the request + its own uncached
tokens). Ahead are the prompt tokens this router has in flight there without a first
token yet *of the request's class or a higher one*: the worker's waiting queue orders
high > normal > low, so a high-priority request waits for high ones only, and a
queue of low-priority prompts does not make a normal request look late. The line is
fitted to the worker's recent first tokens (exponentially weighted least squares,
`CostFit`), each the TTFT over the tokens of work the worker did for this router while
that request waited: the prompt tokens of every request whose first token came back
between its sending and its own first token, its own included (`served` counts them;
`sent` returns the count as of sending). So the line absorbs the worker's prefill speed
and what decoding costs it meanwhile; `base_s` is what even a one-token prompt waits (a
step, the network). The tokens ahead at sending would not do as the sample's work:
higher classes sent later overtake a waiting request, and a low request's wait behind
them would read as a slower worker (measured in benchmarks/overload.py's 5× step: one
worker fitted at 10–19 ms a token where ~3.5 ms was true, and nearly every normal
request refused there). Until the samples spread over MIN_SPREAD_TOKENS the slope cannot
be told from the base, and the line goes through zero (mean TTFT / mean tokens).
While a request waits, work of higher classes keeps arriving and goes first: with
`busy` the share of the worker's time that this router's higher-class arrivals take
(their prompt tokens per second, a moving rate over ~RATE_TAU_S, × `s_per_token`),
the TTFT stretches to estimate / (1 − busy), as in a priority queue; a worker that
higher classes keep busy (`busy` ≥ MAX_BUSY) has no room for the class at all (wait
MAX_ESTIMATE_S). Without this, a normal request admitted during a burst of
high-priority traffic would starve past its SLO. A worker with no sample yet has no
estimate: everything is admitted until one exists. Callers pass the time (`now`,
monotonic seconds).

Estimates still fall short under load: higher classes' arrivals are a moving rate that
lags a rising load, and the work served counts whole the prompts already under way when
a request was sent. And the requests admitted are those estimated under the threshold,
so the errors left among them are the optimistic ones: at the 5× step of
benchmarks/overload.py normal requests took 1.08× their estimate at the median and
1.53× at p90, and 44 of the 72 admitted at an estimate of 7–8 s missed their 8 s SLO:
work the worker did for no one's goodput. So each class's estimates on a worker are
multiplied by its `Calibration.factor`: the QUANTILE-th quantile of actual over estimated TTFT of the
class's recent first tokens there (estimates under MIN_CALIBRATED_S, mostly fixed cost,
and the no-room MAX_ESTIMATE_S are not sampled). A threshold then admits a request when
9 in 10 like it met their estimate.

An `Estimate` has three parts: `own_s`, the request alone on an idle worker; `wait_s`,
what the load adds; `judged_s`, what the thresholds are held against: the estimate
with the request's own tokens capped at the typical request's (the fit's mean tokens
of work), since a prompt's extra length is its own, not the load's. The rule: a
request whose class has a threshold in `reject_above_s` (defaults: the classes' SLOs,
low 20 s, normal 8 s; high 0, none) is refused with RESOURCE_EXHAUSTED when `judged_s` exceeds it;
HTTP clients get 429 with `Retry-After`. So a prompt too long to meet its class's
threshold even on an idle worker is refused only for the work ahead of it: refusing it
on an idle cluster would tell its client to retry what no retry can change. Besides, at
most `max_in_flight` requests are open through this router at once (bounded queues).
Graceful degradation: above `degrade_above_s` of its class (default: low, 1 s; judged
by `judged_s` too) a request's `max_tokens` is capped at `degraded_max_tokens`; it then
ends with finish_reason "length" and the HTTP response carries `x-splitserve-degraded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.config.router import QosConfig
from splitserve.priority import PRIORITIES, class_rank

EMA_WEIGHT = 0.2  # of the newest sample
MIN_SPREAD_TOKENS = 64.0  # the samples' weighted std of tokens needed to fit a slope
RATE_TAU_S = 5.0  # time constant of the arrival rates: a 20 s load step is seen in ~5 s
MAX_BUSY = 0.95
MAX_ESTIMATE_S = 3600.0
QUANTILE = 0.9  # of actual / estimated TTFT, that the estimates are scaled to
CALIBRATION_STEP = 0.05  # of the factor, per sample above it (× QUANTILE) or below
MIN_FACTOR, MAX_FACTOR = 0.5, 4.0
MIN_CALIBRATED_S = 0.5


@dataclass(frozen=True)
class Line:
    """TTFT ≈ base_s + s_per_token × tokens of work."""

    base_s: float
    s_per_token: float

    def at(self, tokens: int) -> float:
        return self.base_s + self.s_per_token * tokens


@dataclass
class CostFit:
    """Exponentially weighted means, variance and covariance of (tokens of work, TTFT)
    over a worker's first tokens, and the line through them."""

    num_samples: int = 0
    mean_tokens: float = 0.0
    mean_s: float = 0.0
    var_tokens: float = 0.0
    cov: float = 0.0

    def add(self, tokens: int, ttft_s: float) -> Line:
        if self.num_samples == 0:
            self.mean_tokens, self.mean_s = float(tokens), ttft_s
        else:
            dx, dy = tokens - self.mean_tokens, ttft_s - self.mean_s
            self.mean_tokens += EMA_WEIGHT * dx
            self.mean_s += EMA_WEIGHT * dy
            self.var_tokens = (1 - EMA_WEIGHT) * (self.var_tokens + EMA_WEIGHT * dx * dx)
            self.cov = (1 - EMA_WEIGHT) * (self.cov + EMA_WEIGHT * dx * dy)
        self.num_samples += 1
        return self.line()

    def line(self) -> Line:
        if self.var_tokens >= MIN_SPREAD_TOKENS ** 2:
            slope = max(0.0, self.cov / self.var_tokens)
            return Line(max(0.0, self.mean_s - slope * self.mean_tokens), slope)
        return Line(0.0, self.mean_s / max(1.0, self.mean_tokens))


@dataclass
class Calibration:
    """The QUANTILE-th quantile of actual over estimated TTFT, tracked by stochastic
    approximation: up by CALIBRATION_STEP × QUANTILE for a sample above it, down by
    CALIBRATION_STEP × (1 − QUANTILE) for one below, so that it settles where
    1 − QUANTILE of the samples are above."""

    factor: float = 1.0

    def add(self, estimated_s: float, actual_s: float) -> None:
        if not MIN_CALIBRATED_S <= estimated_s < MAX_ESTIMATE_S:
            return  # mostly fixed cost; or no room at all (admission off lets it in)
        above = actual_s > estimated_s * self.factor
        self.factor += CALIBRATION_STEP * (QUANTILE if above else QUANTILE - 1.0)
        self.factor = min(MAX_FACTOR, max(MIN_FACTOR, self.factor))


@dataclass(frozen=True)
class Ticket:
    """A request sent to the worker, as `first_token` and `gave_up` take it back."""

    tokens: int  # uncached prompt tokens
    priority: str
    mark: int  # the worker's `served` as of sending
    estimated_s: float | None  # its TTFT as estimated then, before calibration


@dataclass(frozen=True)
class Estimate:
    """A request's TTFT on one worker: `own_s` alone on it, idle; `wait_s` what the
    load adds (the work ahead, and higher classes arriving meanwhile); `judged_s` the
    same estimate for its own tokens capped at the typical request's."""

    own_s: float
    wait_s: float
    judged_s: float

    @property
    def total_s(self) -> float:
        return min(MAX_ESTIMATE_S, self.own_s + self.wait_s)

    def over(self, limit_s: float) -> bool:
        return bool(limit_s) and self.judged_s > limit_s


@dataclass
class TtftModel:
    """One worker's queue as this router sees it."""

    pending: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))  # by class
    line: Line | None = None  # fitted to `fit`; None until the first sample
    fit: CostFit = field(default_factory=CostFit)
    # prompt tokens a second sent there, by class, decaying with RATE_TAU_S, as of rate_at
    rates: list[float] = field(default_factory=lambda: [0.0] * len(PRIORITIES))
    rate_at: float = 0.0
    served: int = 0  # prompt tokens of the requests whose first token came back, ever
    calibration: list[Calibration] = field(
        default_factory=lambda: [Calibration() for _ in PRIORITIES])  # by class

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens sent there with no first token back yet, every class."""
        return sum(self.pending)

    def ahead(self, priority: str) -> int:
        """Pending tokens a request of `priority` waits for: its class and higher ones."""
        return sum(self.pending[:class_rank(priority) + 1])

    def busy(self, priority: str, now: float) -> float:
        """The share of the worker's time that arrivals of higher classes take."""
        if self.line is None:
            return 0.0
        return self.line.s_per_token * self._decay(now) * sum(self.rates[:class_rank(priority)])

    def estimate(self, uncached_tokens: int, priority: str = "normal",
                 now: float = 0.0, calibrated: bool = True) -> Estimate | None:
        if self.line is None:
            return None
        factor = self.calibration[class_rank(priority)].factor if calibrated else 1.0
        own = factor * self.line.at(uncached_tokens)
        busy = self.busy(priority, now)
        if busy >= MAX_BUSY:
            return Estimate(own, MAX_ESTIMATE_S, MAX_ESTIMATE_S)
        ahead = self.ahead(priority)
        typical = min(uncached_tokens, max(1, round(self.fit.mean_tokens)))
        total = factor * self.line.at(ahead + uncached_tokens) / (1.0 - busy)
        judged = factor * self.line.at(ahead + typical) / (1.0 - busy)
        return Estimate(own, min(MAX_ESTIMATE_S, total - own), min(MAX_ESTIMATE_S, judged))

    def sent(self, tokens: int, priority: str = "normal", now: float = 0.0) -> Ticket:
        """A request with `tokens` uncached tokens went out."""
        estimate = self.estimate(tokens, priority, now, calibrated=False)
        rank = class_rank(priority)
        self.pending[rank] += tokens
        decay = self._decay(now)
        self.rates = [r * decay for r in self.rates]
        self.rates[rank] += tokens / RATE_TAU_S
        self.rate_at = max(self.rate_at, now)
        return Ticket(tokens, priority, self.served,
                      None if estimate is None else estimate.total_s)

    def first_token(self, ticket: Ticket, ttft_s: float) -> None:
        """The first token of the request `ticket` was sent for, `ttft_s` after it."""
        self._settle(ticket)
        self.served += ticket.tokens
        self.line = self.fit.add(self.served - ticket.mark, ttft_s)
        if ticket.estimated_s is not None:
            self.calibration[class_rank(ticket.priority)].add(ticket.estimated_s, ttft_s)

    def gave_up(self, ticket: Ticket) -> None:
        """Ended (error, cancel) before its first token."""
        self._settle(ticket)

    def _decay(self, now: float) -> float:
        """How much of the rates as of `rate_at` is left at `now`."""
        return math.exp(-max(0.0, now - self.rate_at) / RATE_TAU_S)

    def _settle(self, ticket: Ticket) -> None:
        rank = class_rank(ticket.priority)
        self.pending[rank] = max(0, self.pending[rank] - ticket.tokens)


def refusal(config: QosConfig, priority: str, estimate: Estimate | None) -> str | None:
    """Why a request of `priority` with this TTFT estimate is refused, or None."""
    if not config.admission or estimate is None:
        return None
    limit = config.reject_above_s.get(priority)
    if not estimate.over(limit):
        return None
    return (f"overloaded: estimated time to first token {estimate.total_s:.1f} s, "
            f"{estimate.wait_s:.1f} s of it waiting for other requests, exceeds {limit:g} s "
            f"for priority {priority or 'normal'}; retry later")


DEFAULT_MAX_TOKENS = 64  # the workers' default when a request names none (generation.proto)


def degraded_max_tokens(config: QosConfig, priority: str, estimate: Estimate | None,
                        max_tokens: int | None) -> int | None:
    """The lower `max_tokens` a request of `priority` gets under this much load, or None
    when it keeps its own."""
    if not config.admission or estimate is None:
        return None
    if not estimate.over(config.degrade_above_s.get(priority)):
        return None
    own = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    return config.degraded_max_tokens if own > config.degraded_max_tokens else None
