"""Leases: sizing, and the fence under every interleaving of renewal, grant, refusal,
lost reply, expiry and write (routing/lease.py, routing/attempts.py).

The model: a decode worker waits for attempt 1 (lease 10 s from t=0, cap 30 s); its
landing pages are reused once the attempt has expired, at the deadline in force +
margin. A prefill worker whose clock is `skew` off asks at `t_req` for a deadline
`until`; the decode worker answers at `t_handle`; the answer reaches the prefill
worker at `t_reply` or never. At every instant the prefill worker may post a write;
a posted write may still be landing until its lease runs out (the transfer timeout
is capped by the remaining lease). The fence: no write lands at or after the reuse.
Every combination of the times below is run (tens of thousands of interleavings).
"""

from __future__ import annotations

import itertools
import math

import pytest

from splitserve.config.daemon import LeaseConfig
from splitserve.routing.attempts import Failure, Phase, RemoteAttempts, RetryContext
from splitserve.routing.lease import JobLease, Refusal, size_lease

MARGIN = 1.0
LEASE_S, MAX_S = 10.0, 30.0
GRID = (0.0, 4.0, 8.0, 9.0, 9.5, 10.0, 10.5, 11.0, 12.0, 16.0, 20.0, 24.0, 28.0, 29.0,
        30.0, 31.0, 35.0, 40.0)
UNTILS = (8.0, 12.0, 25.0, 50.0)
NEVER = math.inf


def ns(t: float) -> int:
    return round(t * 1e9)


class AdoptsWhatItAsks(JobLease):
    """A broken prefill worker: uses the deadline it asked for, granted or not."""

    def ask(self, until_ns: int) -> None:
        self.deadline_ns = max(self.deadline_ns, until_ns)


def violations(skew: float, until: float, t_req: float, t_handle: float, t_reply: float,
               lease_cls: type[JobLease] = JobLease) -> list[float]:
    """Worst-case landing times (decode clock) of writes that land at or after the
    landing pages are reused; [] if the fence held."""
    attempts = RemoteAttempts.start(max_attempts=1, now_s=0.0, lease_s=LEASE_S)
    release_s = attempts.deadline_s + MARGIN  # the engine's quarantine end
    reuse_s = NEVER
    job = lease_cls(ns(LEASE_S), MARGIN)  # the job carries the first deadline
    answer: float | None = None
    write_ends: list[float] = []
    for t in sorted(set(GRID) | {t_req, t_handle} | ({t_reply} - {NEVER})):
        if attempts.phase is Phase.WAITING and attempts.expired(t):  # decode: expiry
            attempts.failed(Failure.LEASE_EXPIRED, RetryContext(False, False))
            reuse_s = release_s
        if t == t_req and isinstance(job, AdoptsWhatItAsks):
            job.ask(ns(until))
        if t == t_handle:  # decode: the renewal arrives
            ext = attempts.extend(1, t, until, MAX_S)
            if ext.granted:
                release_s = ext.deadline_s + MARGIN  # before the grant leaves
                answer = ext.deadline_s
        if t == t_reply and answer is not None:  # prefill: the grant arrives
            job.granted(ns(answer))
        if job.remaining_s(ns(t + skew)) > 0:  # prefill: may post a write now
            write_ends.append((job.deadline_ns / 1e9 - MARGIN) - skew)
    assert attempts.phase is not Phase.WAITING  # the horizon covers every deadline
    return [end for end in write_ends if end >= reuse_s]


def interleavings():
    for t_req, t_handle in itertools.combinations_with_replacement(GRID, 2):
        for t_reply in (*[t for t in GRID if t >= t_handle], NEVER):
            yield t_req, t_handle, t_reply


@pytest.mark.parametrize("skew", [-MARGIN, -MARGIN / 2, 0.0, MARGIN / 2, MARGIN])
def test_fence_holds_for_every_interleaving(skew: float) -> None:
    bad = [(until, *times) for until in UNTILS for times in interleavings()
           if violations(skew, until, *times)]
    assert bad == []


def test_the_model_catches_a_prefill_worker_that_uses_an_ungranted_deadline() -> None:
    bad = [(until, *times) for until in UNTILS for times in interleavings()
           if violations(0.0, until, *times, lease_cls=AdoptsWhatItAsks)]
    assert bad  # e.g. a renewal handled after the expiry: refused, yet used
    assert (25.0, 10.5, 10.5, 10.5) in bad


def test_the_model_catches_skew_beyond_twice_the_margin() -> None:
    assert violations(-2.5 * MARGIN, 8.0, 0.0, 0.0, NEVER)  # no renewal at all


def test_extend_grants_only_the_current_waiting_attempt_before_its_deadline() -> None:
    a = RemoteAttempts.start(max_attempts=2, now_s=100.0, lease_s=10.0)
    assert a.extend(2, 101.0, 150.0, 30.0).refusal is Refusal.NOT_WAITING
    ext = a.extend(1, 101.0, 150.0, 30.0)
    assert ext.granted and ext.deadline_s == a.deadline_s == 130.0  # capped: start + 30
    assert a.extend(1, 102.0, 160.0, 30.0).refusal is Refusal.AT_CAP
    assert a.extend(1, 103.0, 105.0, 30.0).deadline_s == 130.0  # never shortened
    assert a.extend(1, 130.0, 135.0, 60.0).refusal is Refusal.EXPIRED
    assert a.kv_ready(1, 129.0)
    assert a.extend(1, 129.5, 135.0, 60.0).refusal is Refusal.NOT_WAITING  # accepting


def test_a_new_attempt_gets_its_own_cap() -> None:
    a = RemoteAttempts.start(max_attempts=2, now_s=0.0, lease_s=10.0)
    a.failed(Failure.DECLINED, RetryContext(True, True))
    assert a.reserved(50.0, 10.0) == 2
    assert a.extend(2, 51.0, 200.0, 30.0).deadline_s == 80.0


def test_job_lease_moves_only_forward_and_counts_renewals() -> None:
    job = JobLease(ns(10.0), MARGIN)
    assert job.remaining_s(ns(4.0)) == pytest.approx(5.0)
    assert job.wants_renewal(ns(4.0), needed_s=6.0)
    assert not job.wants_renewal(ns(4.0), needed_s=4.0)
    job.granted(ns(8.0))
    assert job.deadline_ns == ns(10.0) and job.num_renewals == 0
    job.granted(ns(20.0))
    assert job.deadline_ns == ns(20.0) and job.num_renewals == 1
    assert job.wanted_deadline_ns(ns(4.0), needed_s=3.0) == ns(4.0 + 6.0 + MARGIN)


def test_size_lease_uses_the_measured_rate_with_bounds() -> None:
    cfg = LeaseConfig(base_s=2.0, per_token_ms=5.0, safety_factor=2.0, max_s=60.0)
    assert size_lease(cfg, 1000, None) == pytest.approx(2.0 + 5.0)  # per_token_ms
    assert size_lease(cfg, 1000, 500.0) == pytest.approx(2.0 + 2 * 2.0)  # measured
    assert size_lease(cfg, 1000, 500.0, queue_wait_s=3.0) == pytest.approx(9.0)
    assert size_lease(cfg, 100_000, 100.0) == 60.0  # capped at max_s
    assert size_lease(cfg, 0, 500.0) == 2.0
