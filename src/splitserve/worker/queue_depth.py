"""The decode worker's view of the prefill queue's depth, polled from the broker.

Depth is what prefill workers will still take: the consumers' pending plus
ack-pending jobs (`queue.depth`), not the stream's message count, which also holds
jobs nobody will take (an unconsumed subject, jobs past `max_deliver`).
"""

from __future__ import annotations

import asyncio
import logging

from splitserve.queue.depth import prefill_queue_depth
from splitserve.worker.core import WorkerCore

log = logging.getLogger(__name__)

POLL_S = 0.25
UNKNOWN_DEPTH = 1 << 30  # broker away: treat the queue as full (everything stays local)


class QueueDepth:
    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.value = 0

    async def poll_forever(self) -> None:
        while True:
            try:
                self.value = await prefill_queue_depth(self.core.broker.js,
                                                       self.core.queue_settings)
            except Exception as exc:  # noqa: BLE001 (broker down: treat the queue as full)
                self.value = UNKNOWN_DEPTH
                log.debug("prefill queue depth unavailable: %r", exc)
            await asyncio.sleep(POLL_S)
