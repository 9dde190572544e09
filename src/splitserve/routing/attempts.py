"""The remote-prefill attempts of one request, as a pure state machine.

No I/O and no clock of its own: the decode worker's adapter (worker/remote.py)
feeds it events with the current monotonic time and carries out what it decides.

    start ──► WAITING(attempt 1, lease deadline)
    WAITING ── kv_ready(current attempt, before the deadline) ──► ACCEPTING
    WAITING ── kv_ready(other attempt, or late) ──► WAITING (stale, ignored)
    WAITING ── expired(now ≥ deadline) ──► failure LEASE_EXPIRED
    WAITING ── extend(current attempt, before the deadline) ──► WAITING (deadline
               moved, at most attempt start + max lease; routing/lease.py)
    WAITING ── failure DECLINED (the prefill worker cannot finish in time) ──► decide
    ACCEPTING ── accepted ──► DECODING (done: remote)
    ACCEPTING ── failure (checksum, accept failed, refused) ──► decide
    WAITING ── failure (worker gone, publish failed, duplicate publish) ──► decide
    decide: RETRY ──► RESERVING(attempt n+1) when the failure is retryable (not a
            refused publish, not a failed accept), attempts
            remain, a prefill worker is registered and the policy still says remote;
            otherwise ──► LOCAL (done: prefilled in this worker)
    RESERVING ── reserved(now, lease_s) ──► WAITING(attempt n+1, new deadline)
    RESERVING ── no_room ──► LOCAL

Every failed attempt's landing pages stay quarantined until its own lease has
expired (the engine's business, see engine/remote_prefill.py); the machine only
decides what happens next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from splitserve.routing.lease import Extension, Refusal


class Phase(Enum):
    WAITING = "waiting for KVReady"
    ACCEPTING = "accepting KVReady"
    RESERVING = "reserving pages for a new attempt"
    DECODING = "decoding (remote prefill done)"
    LOCAL = "prefilling locally"


class Failure(Enum):
    """Why an attempt failed (the value reads well in a log line)."""

    LEASE_EXPIRED = "no KVReady within the lease"
    WORKER_GONE = "a prefill worker left the registry"
    REFUSED = "KVReady refused (bad first token)"
    CHECKSUM_MISMATCH = "landed pages failed their checksums"
    ACCEPT_FAILED = "accepting the landed pages failed"
    PUBLISH_FAILED = "publish failed"
    DUPLICATE_PUBLISH = "the broker reported the job as a duplicate"
    DECLINED = "a prefill worker declined the job (cannot finish within the lease)"


# A broker that refuses a publish (down, stream full) will likely refuse the next
# one too, and an accept that raised points at this worker, not the transfer:
# prefill locally at once rather than spend another lease.
_NOT_RETRYABLE = frozenset({Failure.PUBLISH_FAILED, Failure.ACCEPT_FAILED})


class Next(Enum):
    RETRY = "re-publish on fresh landing pages"
    LOCAL = "prefill locally"


class InvalidTransition(RuntimeError):
    """An event that the current phase does not accept (a bug in the adapter)."""

    def __init__(self, phase: Phase, event: str) -> None:
        super().__init__(f"{event} while {phase.name}")
        self.phase = phase
        self.event = event


@dataclass(frozen=True)
class RetryContext:
    """What the decision after a failure depends on, read when it happens."""

    prefill_worker_live: bool  # some prefill worker is registered (and not excluded)
    policy_remote: bool  # the offload policy still says remote for this prompt


@dataclass
class RemoteAttempts:
    """State of one request's remote prefill. Times are monotonic seconds."""

    max_attempts: int
    deadline_s: float
    start_s: float = 0.0  # when the current attempt's lease began
    attempt: int = 1
    phase: Phase = Phase.WAITING
    failures: list[Failure] = field(default_factory=list)

    @classmethod
    def start(cls, max_attempts: int, now_s: float, lease_s: float) -> RemoteAttempts:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        return cls(max_attempts, now_s + lease_s, now_s)

    @property
    def done(self) -> bool:
        return self.phase in (Phase.DECODING, Phase.LOCAL)

    def remaining_s(self, now_s: float) -> float:
        """Lease time left for the current attempt's KVReady (≤ 0: expired)."""
        return self.deadline_s - now_s

    # --- events -------------------------------------------------------------------------
    def kv_ready(self, attempt: int, now_s: float) -> bool:
        """A KVReady arrived: True if it is the current attempt's, in time (→ ACCEPTING);
        False if stale (another attempt, late, or not waiting)."""
        if self.phase is not Phase.WAITING or attempt != self.attempt or now_s >= self.deadline_s:
            return False
        self.phase = Phase.ACCEPTING
        return True

    def expired(self, now_s: float) -> bool:
        """True if the current attempt's lease has run out while waiting."""
        return self.phase is Phase.WAITING and now_s >= self.deadline_s

    def extend(self, attempt: int, now_s: float, until_s: float, max_lease_s: float
               ) -> Extension:
        """A prefill worker asks for the current attempt's deadline to move to
        `until_s`: granted (up to attempt start + `max_lease_s`) only while waiting
        for that attempt and before its deadline. The caller moves the landing
        pages' release to the new deadline + margin before the grant leaves."""
        if self.phase is not Phase.WAITING or attempt != self.attempt:
            return Extension(self.deadline_s, Refusal.NOT_WAITING)
        if now_s >= self.deadline_s:
            return Extension(self.deadline_s, Refusal.EXPIRED)
        cap_s = self.start_s + max_lease_s
        if cap_s <= self.deadline_s:
            return Extension(self.deadline_s, Refusal.AT_CAP)
        self.deadline_s = max(self.deadline_s, min(until_s, cap_s))
        return Extension(self.deadline_s)

    def accepted(self) -> None:
        self._expect(Phase.ACCEPTING, "accepted")
        self.phase = Phase.DECODING

    def failed(self, failure: Failure, context: RetryContext) -> Next:
        """The current attempt failed: RETRY (→ RESERVING attempt n+1) or LOCAL."""
        self._expect((Phase.WAITING, Phase.ACCEPTING), f"failed({failure.name})")
        self.failures.append(failure)
        if (failure not in _NOT_RETRYABLE and self.attempt < self.max_attempts
                and context.prefill_worker_live and context.policy_remote):
            self.phase = Phase.RESERVING
            return Next.RETRY
        self.phase = Phase.LOCAL
        return Next.LOCAL

    def reserved(self, now_s: float, lease_s: float) -> int:
        """Fresh landing pages for the next attempt: → WAITING; returns its number."""
        self._expect(Phase.RESERVING, "reserved")
        self.attempt += 1
        self.start_s, self.deadline_s = now_s, now_s + lease_s
        self.phase = Phase.WAITING
        return self.attempt

    def no_room(self) -> None:
        """No pages for the next attempt: the engine queued a local prefill."""
        self._expect(Phase.RESERVING, "no_room")
        self.phase = Phase.LOCAL

    @property
    def num_attempts(self) -> int:
        """Attempts made, counting the local prefill after the last failure as one."""
        return self.attempt + (1 if self.phase is Phase.LOCAL else 0)

    def _expect(self, phases: Phase | tuple[Phase, ...], event: str) -> None:
        allowed = phases if isinstance(phases, tuple) else (phases,)
        if self.phase not in allowed:
            raise InvalidTransition(self.phase, event)
