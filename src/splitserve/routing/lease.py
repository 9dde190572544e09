"""Leases that fit the work: how long a remote-prefill attempt may take, and how the
prefill worker doing it gets more time. Pure: no I/O, no clock of its own.

Sizing (the decode worker, at each attempt; `size_lease`):
    lease = base_s + expected queue wait + safety_factor × prompt tokens / prefill rate
clamped to [base_s, max(max_s, base_s)]. The rate is the prefill pool's measured throughput for
prompts of that length (WorkerStats.prefill_rates); until one is measured,
`per_token_ms` stands in.

Renewal (`RemoteAttempts.extend` on the decode side, `JobLease` on the prefill side):
1. a prefill worker that will not finish a job before its deadline D (minus the
   skew margin) asks the job's decode worker for a deadline U > D;
2. the decode worker grants only for the attempt it is waiting for, only before D
   (its clock), and never past attempt start + max_s: D' = min(U, start + max_s).
   It moves the landing pages' release to D' + margin *before* the grant leaves;
   a refused, late or lost renewal changes nothing;
3. the prefill worker writes only while now < D_known − margin, where D_known is
   the latest deadline it was *granted* (never one it asked for).
So whatever the order of grant, refusal, expiry and write, a write lands before the
decode worker's deadline in force, and pages are reused only after that deadline
plus the margin. `tests/unit/test_lease.py` checks every interleaving.

Decline: a prefill worker that estimates it cannot finish even with the longest
lease the decode worker would grant declines the job up front (the decode worker's
attempt fails at once: another attempt or a local prefill) instead of computing and
discarding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from splitserve.config.daemon import LeaseConfig


def size_lease(config: LeaseConfig, num_tokens: int, tokens_per_s: float | None,
               queue_wait_s: float = 0.0) -> float:
    """Seconds for one attempt of a prompt with `num_tokens` uncached tokens."""
    if tokens_per_s and tokens_per_s > 0:
        work_s = config.safety_factor * num_tokens / tokens_per_s
    else:
        work_s = config.per_token_ms * num_tokens / 1e3
    return min(config.cap_s, config.base_s + max(0.0, queue_wait_s) + work_s)


class Refusal(Enum):
    NOT_WAITING = "the attempt is not waiting for KVReady (landed, failed or superseded)"
    EXPIRED = "the lease had already expired"
    AT_CAP = "the lease is already at its cap (attempt start + lease.max_s)"


@dataclass(frozen=True)
class Extension:
    """The decode worker's answer to a renewal: a new deadline, or why not."""

    deadline_s: float  # the deadline in force after the answer (monotonic, decode clock)
    refusal: Refusal | None = None

    @property
    def granted(self) -> bool:
        return self.refusal is None


class JobLease:
    """The prefill worker's view of one job's lease, in unix nanoseconds of its clock.

    `deadline_ns` only ever moves to a deadline the decode worker granted."""

    def __init__(self, deadline_ns: int, margin_s: float) -> None:
        self.deadline_ns = deadline_ns
        self.margin_s = margin_s
        self.num_renewals = 0

    def remaining_s(self, now_ns: int) -> float:
        """Seconds left to post writes (≤ 0: none may be posted)."""
        return (self.deadline_ns - now_ns) / 1e9 - self.margin_s

    def granted(self, deadline_ns: int) -> None:
        if deadline_ns > self.deadline_ns:
            self.deadline_ns = deadline_ns
            self.num_renewals += 1

    def wants_renewal(self, now_ns: int, needed_s: float) -> bool:
        """True if the work still to do (`needed_s`) would outrun the lease."""
        return self.remaining_s(now_ns) < needed_s

    def wanted_deadline_ns(self, now_ns: int, needed_s: float) -> int:
        """The deadline to ask for: the work still to do, the margin, and as much
        again as the work (an estimate is only an estimate)."""
        return now_ns + int((2 * needed_s + self.margin_s) * 1e9)
