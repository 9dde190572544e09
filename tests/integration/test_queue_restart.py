"""Broker restarts: jobs confirmed by a PubAck survive, clients reconnect by themselves."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_queue_work import make_job

from splitserve.queue.broker import NatsServer
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.streams import ensure_prefill_queue, shared_consumer_config
from splitserve.queue.subjects import STREAM_PREFILL
from splitserve.queue.work_queue import JobConsumer, publish_job

pytestmark = pytest.mark.timeout(60)

SHORT = PrefillQueueSettings(ack_wait_s=1.0)


async def collect(consumer: JobConsumer, num_jobs: int, within_s: float) -> dict[str, int]:
    """Fetch and ack until `num_jobs` distinct requests came; request id -> deliveries."""
    seen: dict[str, int] = {}
    deadline = time.monotonic() + within_s
    while len(seen) < num_jobs and time.monotonic() < deadline:
        for delivery in await consumer.fetch(max_jobs=num_jobs - len(seen), timeout_s=0.5):
            seen[delivery.request_id] = delivery.num_delivered
            assert await delivery.ack()
    return seen


async def test_confirmed_jobs_survive_a_broker_restart(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await ensure_prefill_queue(js, SHORT)
    consumer = await JobConsumer.bind(js, shared_consumer_config("high", SHORT))
    for i in range(20):
        await publish_job(js, make_job(f"req-{i:02d}"))
    done = await collect(consumer, 5, within_s=5.0)
    assert len(done) == 5
    in_flight = await consumer.fetch(max_jobs=3, timeout_s=2.0)  # delivered, never acked
    assert len(in_flight) == 3

    await asyncio.to_thread(nats_server.stop)
    assert not await nats_conn.wait_connected(timeout_s=0.2)
    assert not nats_conn.is_connected
    # During the outage fetch waits and returns nothing; it does not raise.
    assert await consumer.fetch(max_jobs=8, timeout_s=0.5) == []

    await asyncio.to_thread(nats_server.start)
    assert await nats_conn.wait_connected(timeout_s=5.0)
    assert nats_conn.num_reconnects >= 1

    rest = await collect(consumer, 15, within_s=15.0)
    expected = {f"req-{i:02d}" for i in range(20)} - set(done)
    assert set(rest) == expected
    # The three in flight at the restart came back as redeliveries.
    assert {rest[d.request_id] for d in in_flight} == {2}

    # The same publisher and consumer carry on.
    await publish_job(js, make_job("req-after"))
    assert set(await collect(consumer, 1, within_s=5.0)) == {"req-after"}
    assert (await js.stream_info(STREAM_PREFILL)).state.messages == 0
    await consumer.close()


async def test_publish_during_an_outage_completes_once_the_broker_is_back(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await ensure_prefill_queue(js, SHORT)
    consumer = await JobConsumer.bind(js, shared_consumer_config("high", SHORT))

    await asyncio.to_thread(nats_server.stop)
    publishing = asyncio.create_task(
        publish_job(js, make_job("req-late"), timeout_s=0.5, retry_for_s=15.0))
    await asyncio.sleep(1.0)
    assert not publishing.done()
    await asyncio.to_thread(nats_server.start)
    seq = await asyncio.wait_for(publishing, 15.0)
    assert seq >= 1

    # Retries reuse the Msg-Id, so the job is stored once even if a try got through
    # before its PubAck was lost.
    assert await collect(consumer, 1, within_s=5.0) == {"req-late": 1}
    assert await consumer.fetch(max_jobs=8, timeout_s=1.5) == []
    await consumer.close()


async def test_registry_heartbeat_resumes_after_a_broker_restart(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    registry = await WorkerRegistry.open(nats_conn.js, BucketSettings(worker_ttl_s=1.0))
    await registry.register("decode-0", b"d0")
    await asyncio.to_thread(nats_server.stop)
    await asyncio.sleep(0.5)  # heartbeats fail meanwhile, without killing the task
    await asyncio.to_thread(nats_server.start)
    assert await nats_conn.wait_connected(timeout_s=5.0)
    # Three TTLs after the restart the entry is still there only if heartbeats resumed.
    await asyncio.sleep(3.0)
    assert await registry.get("decode-0") == b"d0"
    await registry.close()
