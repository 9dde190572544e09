"""WorkerStats on core NATS subjects `splitserve.stats.<role>.<worker_id>`.

Stats are sent about once a second and superseded by the next one, so they are
best effort: no JetStream, a publish during an outage is dropped (logged at
DEBUG), and a slow subscriber drops its oldest unread stats rather than growing.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from splitserve.queue.errors import MalformedMessage
from splitserve.queue.messages import WorkerStats, decode_stats, encode_stats
from splitserve.queue.subjects import stats_filter, stats_subject

log = logging.getLogger(__name__)


async def publish_stats(nc: Client, stats: WorkerStats) -> bool:
    """Send one WorkerStats; False (never an exception) if the broker is away."""
    subject = stats_subject(stats.role, stats.worker_id)
    payload = encode_stats(stats)
    if not nc.is_connected:
        log.debug("worker %s: stats dropped, not connected", stats.worker_id)
        return False
    try:
        await nc.publish(subject, payload)
    except nats.errors.Error as err:
        log.debug("worker %s: stats dropped (%s)", stats.worker_id, err)
        return False
    return True


class StatsSubscription:
    """Async iterator of WorkerStats from one role and/or worker (None: all)."""

    def __init__(self, max_pending: int = 1024) -> None:
        self._queue: asyncio.Queue[WorkerStats] = asyncio.Queue(maxsize=max_pending)
        self._sub: Subscription | None = None
        self.num_dropped = 0
        self.num_malformed = 0

    @classmethod
    async def subscribe(cls, nc: Client, role: str | None = None, worker_id: str | None = None,
                        max_pending: int = 1024) -> StatsSubscription:
        subscription = cls(max_pending)
        subscription._sub = await nc.subscribe(stats_filter(role, worker_id),
                                               cb=subscription._on_msg)
        return subscription

    async def _on_msg(self, msg: Msg) -> None:
        try:
            stats = decode_stats(msg.data)
        except MalformedMessage as err:
            self.num_malformed += 1
            log.warning("stats on %s dropped: %s", msg.subject, err)
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.num_dropped += 1
        self._queue.put_nowait(stats)

    async def next(self, timeout_s: float | None = None) -> WorkerStats:
        """The next stats message; asyncio.TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):  # not wait_for: see tasks.py
            return await self._queue.get()

    def __aiter__(self) -> StatsSubscription:
        return self

    async def __anext__(self) -> WorkerStats:
        return await self._queue.get()

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error as err:
                log.debug("stats unsubscribe failed: %s", err)
            self._sub = None
