"""The prefill side of a job's lease: estimate the work, renew before the deadline,
decline what cannot be finished (rules in routing/lease.py).

At dequeue the worker estimates the job (prefill at its own measured rate for that
prompt length, `per_token_ms` until measured, plus the transfer): if the lease will
not cover it, it asks the decode worker for more time at once; a refusal at the cap
(or a grant still too short) declines the job, so the decode worker goes on at once
instead of waiting out a lease for work that would be thrown away. While the job
runs, `keep` renews whenever the estimated work left would outrun the lease. Only
granted deadlines ever count (`JobLease`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import Enum

from splitserve.queue.lease import request_lease
from splitserve.routing.lease import JobLease, Refusal
from splitserve.rpc.jobs_pb2 import LeaseReply, LeaseRequest, PrefillJob
from splitserve.worker.core import WorkerCore

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.25
SLACK_S = 1.0  # on top of the estimate: the notification, a busy event loop


class Renewal(Enum):
    GRANTED = "granted"  # the deadline moved (possibly less than asked: the cap)
    NO_ANSWER = "no answer"  # the lease in hand stands
    AT_CAP = "refused at the cap"
    STALE = "refused: the attempt is over"


class UpFront(Enum):
    GO = "go"  # the lease covers the estimate (or the decode worker did not answer)
    DECLINE = "decline"  # even the longest lease would not: decline the job
    STALE = "stale"  # the decode worker no longer waits for this attempt


class LeaseKeeper:
    def __init__(self, core: WorkerCore, job: PrefillJob, margin_s: float) -> None:
        self.core = core
        self.job = job
        self.lease = JobLease(job.lease_deadline_unix_ns, margin_s)
        self.started_s = time.monotonic()
        self.estimate_s = self._estimate_s(len(job.token_ids) - job.num_cached_tokens)

    def remaining_s(self) -> float:
        """Seconds left to post writes under the latest granted deadline."""
        return self.lease.remaining_s(self.core.now_unix_ns())

    def needed_s(self) -> float:
        """Estimated work left, with slack."""
        left = self.estimate_s - (time.monotonic() - self.started_s)
        return max(left, 0.1 * self.estimate_s) + SLACK_S

    async def up_front(self) -> UpFront:
        needed = self.needed_s()
        if not self.lease.wants_renewal(self.core.now_unix_ns(), needed):
            return UpFront.GO
        result = await self.renew(needed)
        if result is Renewal.STALE:
            return UpFront.STALE
        if result is not Renewal.NO_ANSWER and \
                self.lease.wants_renewal(self.core.now_unix_ns(), needed):
            return UpFront.DECLINE  # at the cap: more time will not come
        return UpFront.GO

    async def renew(self, needed_s: float) -> Renewal:
        """Ask for a deadline covering `needed_s`."""
        now_ns = self.core.now_unix_ns()
        reply = await self._ask(LeaseRequest(
            wanted_deadline_unix_ns=self.lease.wanted_deadline_ns(now_ns, needed_s)))
        if reply is None:
            return Renewal.NO_ANSWER
        if not reply.granted:
            return Renewal.AT_CAP if reply.refusal == Refusal.AT_CAP.name else Renewal.STALE
        before = self.lease.deadline_ns
        self.lease.granted(reply.deadline_unix_ns)
        if self.lease.deadline_ns > before:
            self.core.counters.num_lease_renewals += 1
            log.info("job %s:%d: lease renewed by %.2f s", self.job.request_id,
                     self.job.attempt, (self.lease.deadline_ns - before) / 1e9)
        return Renewal.GRANTED

    async def decline(self) -> None:
        reason = (f"estimated {self.estimate_s:.1f} s of work, lease "
                  f"{self.remaining_s():.1f} s at its cap")
        self.core.counters.num_declined_jobs += 1
        log.warning("job %s:%d declined: %s", self.job.request_id, self.job.attempt, reason)
        await self._ask(LeaseRequest(decline=True, reason=reason))

    async def keep(self) -> None:
        """Run alongside the job: renew whenever the work left would outrun the lease."""
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(CHECK_EVERY_S)
                needed = self.needed_s()
                if (self.lease.wants_renewal(self.core.now_unix_ns(), needed)
                        and await self.renew(needed) in (Renewal.AT_CAP, Renewal.STALE)):
                    return  # refused: finish within the lease in hand, or not at all

    async def _ask(self, request: LeaseRequest) -> LeaseReply | None:
        if not self.core.has_messaging:
            return None
        broker = self.core.broker
        request.request_id, request.attempt = self.job.request_id, self.job.attempt
        request.dest_incarnation = self.job.dest_incarnation
        request.prefill_worker_id = self.core.worker_id
        return await request_lease(broker.nc, self.job.dest_worker_id, request)

    def _estimate_s(self, num_tokens: int) -> float:
        """This worker's measured rate for prompts of this length, else per_token_ms."""
        rate = self.core.windows.prefill_rate(time.monotonic(), num_tokens)
        if rate:
            return num_tokens / rate
        return self.core.config.lease.per_token_ms * num_tokens / 1e3
