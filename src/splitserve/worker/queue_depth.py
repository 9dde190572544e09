"""The decode worker's view of the prefill queue's depth, polled from the broker.

Depth is what prefill workers will still take: the consumers' pending plus
ack-pending jobs (`queue.depth`), not the stream's message count, which also holds
jobs nobody will take (an unconsumed subject, jobs past `max_deliver`).

While the broker does not answer, the depth is unknown and counts as full: every
prompt stays local. Each poll gets POLL_TIMEOUT_S, not the client's 5 s: in a NATS
cluster whose metadata leader died, the consumer listing goes unanswered until a new
one is elected, and a request sent just before that would keep the depth unknown
(every prompt local) for up to 5 s after the cluster is whole again (seen in the
chaos suite's nats_node_kill row).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from splitserve.queue.depth import prefill_queue_depth
from splitserve.worker.core import WorkerCore

log = logging.getLogger(__name__)

POLL_S = 0.25
POLL_TIMEOUT_S = 1.0
UNKNOWN_DEPTH = 1 << 30  # broker away: treat the queue as full (everything stays local)


def broker_depth(core: WorkerCore) -> Callable[[], Awaitable[int]]:
    """The query of this worker's broker (its connection as of each call)."""
    return lambda: prefill_queue_depth(core.broker.js, core.queue_settings)


class QueueDepth:
    """`value`: the latest depth `query()` returned, or UNKNOWN_DEPTH since it failed."""

    def __init__(self, query: Callable[[], Awaitable[int]],
                 timeout_s: float = POLL_TIMEOUT_S) -> None:
        self.query = query
        self.timeout_s = timeout_s
        self.value = 0
        self._unknown_since: float | None = None

    async def poll_forever(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(POLL_S)

    async def poll(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):  # not wait_for: see tasks.py
                self.value = await self.query()
        except Exception as exc:  # noqa: BLE001 (broker away: treat the queue as full)
            self.value = UNKNOWN_DEPTH
            if self._unknown_since is None:
                self._unknown_since = time.monotonic()
                log.warning("prefill queue depth unknown (%r): prompts stay local until "
                            "the broker answers", exc)
            return
        if self._unknown_since is not None:
            log.info("prefill queue depth known again after %.1f s: %d",
                     time.monotonic() - self._unknown_since, self.value)
            self._unknown_since = None
