"""A decode worker's prefix-cache changes, announced to the routers.

Life cycle of one change: the engine thread records it (a full page cached under its
chained hash, or that hash evicted) and the next delivered `EngineStats` carries it
(`kv_events`); `KVEventPublisher.on_stats` nets it into `pending` (a hash's last
change wins); every `interval_s` the pending changes go out as one `KVCacheEvents`
on `splitserve.kv.<worker_id>`. Core NATS, best effort: while the broker is away, or
when more than `max_pending` hashes pile up, the changes are dropped and the next
message says `reset` (receivers forget what they knew of this worker).
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from splitserve.engine.stats import EngineStats
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.messages import KVCacheEvents
from splitserve.queue.subjects import kv_events_subject

log = logging.getLogger(__name__)


class KVEventPublisher:
    def __init__(self, worker_id: str, incarnation: str, page_size: int, *,
                 interval_s: float = 0.05, max_pending: int = 1 << 16) -> None:
        self.worker_id = worker_id
        self.incarnation = incarnation
        self.page_size = page_size
        self.interval_s = interval_s
        self.max_pending = max_pending
        self.pending: dict[bytes, bool] = {}  # hash → cached now (True) or not (False)
        self.reset = True  # the first message voids whatever a router knew before
        self.seq = 0
        self.num_sent = 0
        self.num_dropped = 0  # changes lost to an outage or an overflow

    def on_stats(self, stats: EngineStats) -> None:
        for stored, page_hash in stats.kv_events:
            self.pending[page_hash] = stored
        if len(self.pending) > self.max_pending:
            self._drop()

    def _drop(self) -> None:
        self.num_dropped += len(self.pending)
        self.pending.clear()
        self.reset = True

    def take(self) -> KVCacheEvents | None:
        """The next message (None when there is nothing to say)."""
        if not self.pending and not self.reset:
            return None
        self.seq += 1
        message = KVCacheEvents(
            worker_id=self.worker_id, incarnation=self.incarnation, seq=self.seq,
            page_size=self.page_size, reset=self.reset,
            stored=[h for h, cached in self.pending.items() if cached],
            removed=[h for h, cached in self.pending.items() if not cached])
        self.pending.clear()
        self.reset = False
        return message

    async def run(self, broker: BrokerConnection) -> None:
        subject = kv_events_subject(self.worker_id)
        while True:
            await asyncio.sleep(self.interval_s)
            if not broker.nc.is_connected:
                if self.pending:
                    self._drop()
                continue
            message = self.take()
            if message is None:
                continue
            try:
                await broker.nc.publish(subject, message.SerializeToString())
                self.num_sent += 1
            except nats.errors.Error as exc:
                log.debug("worker %s: KV events dropped (%s)", self.worker_id, exc)
                self.num_dropped += len(message.stored) + len(message.removed)
                self.reset = True
