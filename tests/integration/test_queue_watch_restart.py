"""The registry watch the decode worker relies on (to notice a prefill worker leave)
keeps reporting changes across a broker restart, promptly."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from splitserve.queue.broker import NatsServer
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings

pytestmark = pytest.mark.timeout(90)


async def next_change(events: asyncio.Queue, within_s: float):
    return await asyncio.wait_for(events.get(), within_s)


async def test_registry_watch_restarts_at_reconnect_and_sees_changes(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    registry = await WorkerRegistry.open(nats_conn.js, BucketSettings())
    events: asyncio.Queue[tuple[str, bytes | None] | None] = asyncio.Queue()

    async def watch() -> None:
        async for event in registry.watch_forever(nats_conn):
            await events.put(event)

    task = asyncio.create_task(watch())
    try:
        await registry.register("prefill-0", b"p0")
        assert await next_change(events, 10) == ("prefill-0", b"p0")
        await asyncio.to_thread(nats_server.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(nats_server.start)
        assert await nats_conn.wait_connected(timeout_s=10.0)
        restarted_at = time.monotonic()
        # the client's own watch took ~19 s to resume here; restarting it is immediate
        assert await next_change(events, 5) is None
        assert await next_change(events, 5) == ("prefill-0", b"p0")  # the fresh snapshot
        assert time.monotonic() - restarted_at < 5.0
        await registry.register("prefill-1", b"p1")
        await registry.deregister("prefill-0")
        assert await next_change(events, 5) == ("prefill-1", b"p1")
        assert await next_change(events, 5) == ("prefill-0", None)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.close()
