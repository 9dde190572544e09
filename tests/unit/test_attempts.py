"""The remote-attempt state machine: every transition, in milliseconds, no subprocesses."""

from __future__ import annotations

import pytest

from splitserve.routing.attempts import (
    Failure,
    InvalidTransition,
    Next,
    Phase,
    RemoteAttempts,
    RetryContext,
)

GO = RetryContext(prefill_worker_live=True, policy_remote=True)


def waiting(max_attempts: int = 2) -> RemoteAttempts:
    return RemoteAttempts.start(max_attempts, now_s=100.0, lease_s=5.0)


def test_start_waits_for_attempt_one_under_its_lease() -> None:
    m = waiting()
    assert (m.phase, m.attempt, m.deadline_s) == (Phase.WAITING, 1, 105.0)
    assert m.remaining_s(101.5) == 3.5 and not m.done
    with pytest.raises(ValueError):
        RemoteAttempts.start(0, 0.0, 1.0)


def test_kv_ready_in_time_then_accepted_is_a_remote_prefill() -> None:
    m = waiting()
    assert m.kv_ready(1, 104.9)
    assert m.phase is Phase.ACCEPTING
    m.accepted()
    assert (m.phase, m.num_attempts, m.done) == (Phase.DECODING, 1, True)


@pytest.mark.parametrize("attempt,now", [(2, 101.0), (0, 101.0), (1, 105.0), (1, 200.0)])
def test_stale_or_late_kv_ready_is_ignored(attempt: int, now: float) -> None:
    m = waiting()
    assert not m.kv_ready(attempt, now)
    assert m.phase is Phase.WAITING


def test_duplicate_kv_ready_is_ignored_while_accepting() -> None:
    m = waiting()
    assert m.kv_ready(1, 101.0)
    assert not m.kv_ready(1, 101.1)
    m.accepted()
    assert not m.kv_ready(1, 101.2)


def test_expiry_is_reported_only_while_waiting_and_after_the_deadline() -> None:
    m = waiting()
    assert not m.expired(104.999) and m.expired(105.0)
    m.kv_ready(1, 101.0)
    assert not m.expired(200.0)


NOT_RETRYABLE = (Failure.PUBLISH_FAILED, Failure.ACCEPT_FAILED)


@pytest.mark.parametrize("failure", [f for f in Failure if f not in NOT_RETRYABLE])
def test_retryable_failure_reserves_attempt_two_with_a_fresh_lease(failure: Failure) -> None:
    m = waiting()
    assert m.failed(failure, GO) is Next.RETRY
    assert m.phase is Phase.RESERVING and m.failures == [failure]
    assert m.reserved(now_s=107.0, lease_s=6.0) == 2
    assert (m.phase, m.attempt, m.deadline_s) == (Phase.WAITING, 2, 113.0)
    assert not m.kv_ready(1, 108.0)  # attempt 1 is stale now
    assert m.kv_ready(2, 108.0)


@pytest.mark.parametrize("failure", NOT_RETRYABLE)
def test_publish_or_accept_failure_goes_local_at_once(failure: Failure) -> None:
    m = waiting(max_attempts=5)
    assert m.failed(failure, GO) is Next.LOCAL
    assert (m.phase, m.num_attempts, m.done) == (Phase.LOCAL, 2, True)


@pytest.mark.parametrize("context", [
    RetryContext(prefill_worker_live=False, policy_remote=True),
    RetryContext(prefill_worker_live=True, policy_remote=False),
])
def test_no_retry_without_a_prefill_worker_or_when_the_policy_says_local(
        context: RetryContext) -> None:
    m = waiting()
    assert m.failed(Failure.LEASE_EXPIRED, context) is Next.LOCAL
    assert m.phase is Phase.LOCAL


def test_attempts_run_out_then_local() -> None:
    m = waiting(max_attempts=2)
    assert m.failed(Failure.LEASE_EXPIRED, GO) is Next.RETRY
    m.reserved(106.0, 5.0)
    assert m.kv_ready(2, 107.0)
    assert m.failed(Failure.CHECKSUM_MISMATCH, GO) is Next.LOCAL
    assert m.failures == [Failure.LEASE_EXPIRED, Failure.CHECKSUM_MISMATCH]
    assert m.num_attempts == 3  # two remote attempts, then the local prefill


def test_one_attempt_allowed_never_retries() -> None:
    m = waiting(max_attempts=1)
    assert m.failed(Failure.WORKER_GONE, GO) is Next.LOCAL


def test_no_room_for_the_next_attempt_goes_local() -> None:
    m = waiting()
    m.failed(Failure.LEASE_EXPIRED, GO)
    m.no_room()
    assert (m.phase, m.attempt, m.num_attempts) == (Phase.LOCAL, 1, 2)


def test_failure_while_accepting_is_a_failed_attempt() -> None:
    m = waiting()
    assert m.kv_ready(1, 101.0)
    assert m.failed(Failure.CHECKSUM_MISMATCH, GO) is Next.RETRY
    m.reserved(102.0, 5.0)
    assert m.kv_ready(2, 103.0)
    assert m.failed(Failure.ACCEPT_FAILED, GO) is Next.LOCAL


@pytest.mark.parametrize("phase,event", [
    (Phase.WAITING, lambda m: m.accepted()),
    (Phase.WAITING, lambda m: m.reserved(0.0, 1.0)),
    (Phase.WAITING, lambda m: m.no_room()),
    (Phase.DECODING, lambda m: m.failed(Failure.LEASE_EXPIRED, GO)),
    (Phase.LOCAL, lambda m: m.failed(Failure.LEASE_EXPIRED, GO)),
    (Phase.RESERVING, lambda m: m.failed(Failure.LEASE_EXPIRED, GO)),
    (Phase.RESERVING, lambda m: m.accepted()),
])
def test_events_the_phase_does_not_accept_raise(phase: Phase, event) -> None:  # type: ignore[no-untyped-def]
    m = waiting()
    m.phase = phase
    with pytest.raises(InvalidTransition):
        event(m)
    assert m.phase is phase
