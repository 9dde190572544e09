"""The decode worker's lease desk: how long each attempt's lease is, and the answers
to prefill workers asking for more time or declining a job (routing/lease.py).

- Sizing: the prefill pool's measured rate for the prompt's length (the freshest
  `WorkerStats.prefill_rates` of each prefill worker, averaged), a queue wait of
  (jobs queued / prefill workers) × this prompt's estimated time, and the safety
  factor; `per_token_ms` until a rate is measured.
- Renewal: granted only for the attempt this worker waits for, before its deadline,
  up to attempt start + `lease.max_s`; the landing pages' release moves (on the
  engine thread) *before* the grant is sent; if the attempt ended meanwhile the
  answer is a refusal.
- Decline: the attempt fails at once (`Failure.DECLINED`): another attempt or local.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from splitserve.engine.async_engine import AsyncEngine
from splitserve.queue.lease import LeaseResponder
from splitserve.queue.stats import StatsSubscription
from splitserve.routing.attempts import RemoteAttempts
from splitserve.routing.lease import Refusal, size_lease
from splitserve.rpc.jobs_pb2 import KVReady, LeaseReply, LeaseRequest, WorkerStats
from splitserve.tasks import logged_task, stop_tasks
from splitserve.worker.core import WorkerCore

log = logging.getLogger(__name__)

STATS_STALE_S = 30.0  # a prefill worker's stats older than this no longer count


class PrefillDeclined(Exception):
    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"prefill worker {worker_id} declined the job: {reason}")


class Waiting(Protocol):
    """What the desk needs of an attempt the decode worker waits for."""

    attempts: RemoteAttempts
    kv_ready: asyncio.Future[KVReady]


class LeaseDesk:
    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self._pool: dict[str, tuple[float, WorkerStats]] = {}  # worker → (received, stats)
        self._responder: LeaseResponder | None = None
        self._stats: StatsSubscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, answer: Callable[[LeaseRequest], Awaitable[LeaseReply]]) -> None:
        broker = self.core.broker
        self._responder = await LeaseResponder.start(broker.nc, self.core.worker_id, answer)
        self._stats = await StatsSubscription.subscribe(broker.nc, role="prefill",
                                                        max_pending=256)
        self._task = logged_task(self._collect_stats(), "prefill stats collector")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        for closer in (self._responder, self._stats):
            if closer is not None:
                await closer.close()

    async def _collect_stats(self) -> None:
        assert self._stats is not None
        async for stats in self._stats:
            self._pool[stats.worker_id] = (time.monotonic(), stats)

    # --- sizing --------------------------------------------------------------------
    def lease_s(self, num_tokens: int, queue_depth: int, num_prefill_workers: int) -> float:
        """Seconds for one attempt of a prompt with `num_tokens` uncached tokens."""
        return self.lease_rule(queue_depth, num_prefill_workers)(num_tokens)

    def lease_rule(self, queue_depth: int, num_prefill_workers: int) -> Callable[[int], float]:
        """`lease_s` with this moment's measured rates and queue captured: a pure
        function of the uncached prompt length, for the engine thread to evaluate."""
        lease, pool = self.core.config.lease, self._fresh_stats()

        def lease_for(num_tokens: int) -> float:
            rate = _pool_rate(pool, num_tokens)
            job_s = num_tokens / rate if rate else lease.per_token_ms * num_tokens / 1e3
            queue_wait_s = queue_depth * job_s / max(1, num_prefill_workers)
            return size_lease(lease, num_tokens, rate, queue_wait_s)

        return lease_for

    def _fresh_stats(self) -> list[WorkerStats]:
        now = time.monotonic()
        return [stats for received, stats in self._pool.values()
                if now - received <= STATS_STALE_S]

    # --- renewals and declines -------------------------------------------------------
    async def answer(self, request: LeaseRequest, waiting_now: Callable[[], Waiting | None],
                     engine: AsyncEngine) -> LeaseReply:
        """`waiting_now()`: the attempt this worker waits for under the request's id."""
        waiting = waiting_now()
        if (request.dest_incarnation != self.core.incarnation or waiting is None
                or waiting.attempts.attempt != request.attempt or waiting.kv_ready.done()):
            return LeaseReply(granted=False, refusal=Refusal.NOT_WAITING.name)
        if request.decline:
            waiting.kv_ready.set_exception(
                PrefillDeclined(request.prefill_worker_id, request.reason))
            return LeaseReply(granted=True)
        lease = self.core.config.lease
        now_s, now_ns = time.monotonic(), self.core.now_unix_ns()
        until_s = now_s + (request.wanted_deadline_unix_ns - now_ns) / 1e9
        ext = waiting.attempts.extend(request.attempt, now_s, until_s, lease.cap_s)
        if ext.granted:
            # The pages' release moves before the grant leaves; if the attempt ended
            # meanwhile (landed, failed), the engine says so and the answer is no.
            release_at = ext.deadline_s + lease.skew_margin_s
            moved = await engine.call(lambda e: e.extend_remote(
                request.request_id, request.attempt, release_at))
            if not moved or waiting_now() is not waiting:
                return LeaseReply(granted=False, refusal=Refusal.NOT_WAITING.name)
            self.core.counters.num_lease_renewals += 1
        return LeaseReply(granted=ext.granted,
                          deadline_unix_ns=now_ns + int((ext.deadline_s - now_s) * 1e9),
                          refusal=ext.refusal.name if ext.refusal else "")


def _pool_rate(pool: list[WorkerStats], num_tokens: int) -> float | None:
    """The prefill pool's measured tokens/s for prompts of this length: the mean of the
    workers' rates in the bucket of `num_tokens` (None: nothing measured lately)."""
    rates = []
    for stats in pool:
        buckets = sorted(stats.prefill_rates, key=lambda r: r.min_tokens)
        i = bisect.bisect_right([r.min_tokens for r in buckets], num_tokens) - 1
        if i >= 0 and (buckets[i].max_tokens == 0 or num_tokens < buckets[i].max_tokens):
            rates.append(buckets[i].tokens_per_s)
    return sum(rates) / len(rates) if rates else None
