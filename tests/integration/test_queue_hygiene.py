"""Queue hygiene on a real broker: stream limits, duplicate publishes, the queue
depth as the consumers see it (and the decode worker's poll of it), and replica
settings."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.js import api
from test_queue_work import make_job

from splitserve.errors import ConfigError
from splitserve.queue.broker import NatsServer
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.depth import prefill_queue_depth
from splitserve.queue.errors import PublishFailed, QueueFull, QueueSetupError
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.streams import (
    ensure_messaging,
    ensure_prefill_queue,
    ensure_prefill_stream,
    shared_consumer_config,
)
from splitserve.queue.subjects import BUCKET_POLICY, BUCKET_WORKERS, STREAM_PREFILL
from splitserve.queue.work_queue import JobConsumer, publish_job
from splitserve.worker.queue_depth import POLL_TIMEOUT_S, UNKNOWN_DEPTH, QueueDepth

pytestmark = pytest.mark.timeout(30)

SHORT = PrefillQueueSettings(ack_wait_s=1.0)


async def num_stored(conn: BrokerConnection) -> int:
    return int((await conn.js.stream_info(STREAM_PREFILL)).state.messages)


# --- 1. stream limits ----------------------------------------------------------------
def test_stream_limits_are_finite_by_default_and_validated() -> None:
    settings = PrefillQueueSettings()
    assert (settings.max_msgs, settings.max_bytes) == (10_000, 256 * 1024 * 1024)
    for field in ("max_msgs", "max_bytes"):
        with pytest.raises(ConfigError) as info:
            PrefillQueueSettings(**{field: 0})  # type: ignore[arg-type]
        assert info.value.field == f"queue.{field}"
    assert PrefillQueueSettings(max_msgs=-1, max_bytes=-1).max_msgs == -1  # unlimited


async def test_default_stream_has_the_finite_limits_and_discards_new(
        nats_conn: BrokerConnection) -> None:
    info = await ensure_prefill_stream(nats_conn.js, PrefillQueueSettings())
    assert (info.config.max_msgs, info.config.max_bytes) == (10_000, 256 * 1024 * 1024)
    assert info.config.discard == api.DiscardPolicy.NEW


@pytest.mark.parametrize(("field", "limit"), [("max_msgs", "maximum messages exceeded"),
                                              ("max_bytes", "maximum bytes exceeded")])
async def test_full_stream_refuses_at_once_with_queue_full(
        nats_conn: BrokerConnection, field: str, limit: str) -> None:
    js = nats_conn.js
    await ensure_prefill_queue(js, SHORT)
    assert await publish_job(js, make_job("req-0")) == 1
    assert await publish_job(js, make_job("req-1")) == 2
    state = (await js.stream_info(STREAM_PREFILL)).state
    full = {"max_msgs": state.messages, "max_bytes": state.bytes}[field]
    await ensure_prefill_queue(js, dataclasses.replace(SHORT, **{field: full}))

    start = time.monotonic()
    with pytest.raises(QueueFull) as info:
        await publish_job(js, make_job("req-2"), retry_for_s=20.0)
    # Not retried for retry_for_s: a full queue does not drain within a deadline.
    assert time.monotonic() - start < 5.0
    assert isinstance(info.value, PublishFailed)
    assert (info.value.request_id, info.value.attempt, info.value.limit) == ("req-2", 1, limit)
    assert await num_stored(nats_conn) == 2  # discard=new: the queued jobs stay


# --- 2. duplicate publishes ----------------------------------------------------------
# (A first-try duplicate raising DuplicateJob: test_queue_work.py)
async def test_duplicate_pub_ack_after_a_lost_one_is_success(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    await ensure_prefill_queue(nats_conn.js, SHORT)
    pid = nats_server.pid
    assert pid is not None
    # A frozen broker reads the first try but answers nothing: its PubAck is lost.
    os.kill(pid, signal.SIGSTOP)
    try:
        publishing = asyncio.create_task(
            publish_job(nats_conn.js, make_job("req-1"), timeout_s=0.3, retry_for_s=10.0))
        await asyncio.sleep(1.0)  # the first try and a few retries time out meanwhile
        assert not publishing.done()
    finally:
        os.kill(pid, signal.SIGCONT)
    # The first try is stored now; a later try's PubAck says "duplicate": that is ours.
    assert await publishing == 1
    assert await num_stored(nats_conn) == 1


# --- 3. queue depth from the consumers ----------------------------------------------
async def test_depth_counts_only_jobs_a_consumer_will_take(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await ensure_prefill_queue(js, SHORT)
    assert await prefill_queue_depth(js, SHORT) == 0

    # validate_job accepts any priority token; no consumer filters this one.
    await publish_job(js, make_job("req-bogus", priority="bogus"))
    assert await num_stored(nats_conn) == 1
    assert await prefill_queue_depth(js, SHORT) == 0

    await publish_job(js, make_job("req-1"))
    await publish_job(js, make_job("req-2", priority="low"))
    assert await prefill_queue_depth(js, SHORT) == 2

    high = await JobConsumer.bind(js, shared_consumer_config("high", SHORT))
    [delivery] = await high.fetch(max_jobs=1, timeout_s=2.0)
    assert await prefill_queue_depth(js, SHORT) == 2  # ack-pending still counts
    assert await delivery.ack()
    # The broker confirms the ack first and drops the job a moment later (under load).
    assert await _eventually(lambda: prefill_queue_depth(js, SHORT), 1)
    assert await _eventually(lambda: num_stored(nats_conn), 2)  # req-bogus and req-2
    await high.close()


async def _eventually(read: Callable[[], Awaitable[int]], want: int,
                      timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while (got := await read()) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert got == want
    return True


async def test_depth_counts_direct_consumers(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await ensure_prefill_queue(js, SHORT, worker_ids=["prefill-0", "prefill-1"])
    await publish_job(js, make_job("req-0"), prefill_worker_id="prefill-0")
    await publish_job(js, make_job("req-1"), prefill_worker_id="prefill-1")
    await publish_job(js, make_job("req-2"), prefill_worker_id="prefill-1")
    # A direct subject of a worker without a consumer: nobody takes it.
    await publish_job(js, make_job("req-3"), prefill_worker_id="prefill-9")
    assert await num_stored(nats_conn) == 4
    assert await prefill_queue_depth(js, SHORT) == 3


async def test_an_unanswered_depth_poll_is_given_up_within_its_timeout(
        nats_conn: BrokerConnection) -> None:
    """A NATS cluster without a metadata leader drops the consumer listing: the poll
    must not wait out the client's 5 s, or every prompt stays local that long after
    the cluster answers again. Here a JetStream API prefix that a silent subscriber
    swallows stands in for the lost request; the next poll asks the real one."""
    await ensure_prefill_queue(nats_conn.js, SHORT)
    await publish_job(nats_conn.js, make_job("req-1"))
    await nats_conn.nc.subscribe("silent.>", cb=_ignore)
    js = [nats_conn.nc.jetstream(prefix="silent"), nats_conn.js]
    depth = QueueDepth(lambda: prefill_queue_depth(js[0], SHORT))
    started = time.monotonic()
    await depth.poll()
    assert depth.value == UNKNOWN_DEPTH
    assert time.monotonic() - started < POLL_TIMEOUT_S + 1.0  # the client's own: 5 s
    js.pop(0)  # the cluster answers again
    await depth.poll()
    assert depth.value == 1


async def _ignore(msg: object) -> None:
    del msg


async def test_depth_leaves_out_jobs_past_max_deliver(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    settings = dataclasses.replace(SHORT, max_deliver=1)
    await ensure_prefill_queue(js, settings)
    consumer = await JobConsumer.bind(js, shared_consumer_config("normal", settings))
    await publish_job(js, make_job("req-poison", priority="normal"))
    [delivery] = await consumer.fetch(max_jobs=1, timeout_s=2.0)
    assert await delivery.nak()
    assert await consumer.fetch(max_jobs=1, timeout_s=1.5) == []  # never again
    assert await num_stored(nats_conn) == 1  # work-queue retention keeps it
    assert await prefill_queue_depth(js, settings) == 0
    await consumer.close()


# --- 4. replicas ---------------------------------------------------------------------
def test_replicas_are_validated() -> None:
    for make, field in ((PrefillQueueSettings, "queue.replicas"),
                        (BucketSettings, "buckets.replicas")):
        for replicas in (0, 2, 4):
            with pytest.raises(ConfigError) as info:
                make(replicas=replicas)
            assert info.value.field == field
        assert make(replicas=3).replicas == 3


async def test_stream_and_buckets_take_the_replicas_setting(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await ensure_messaging(js, PrefillQueueSettings(), BucketSettings())
    for stream in (STREAM_PREFILL, f"KV_{BUCKET_WORKERS}", f"KV_{BUCKET_POLICY}"):
        assert (await js.stream_info(stream)).config.num_replicas == 1
    # A single server cannot hold 3 copies: the setup says so instead of ignoring it.
    with pytest.raises(QueueSetupError) as info:
        await ensure_messaging(js, PrefillQueueSettings(replicas=3), BucketSettings(replicas=3))
    assert info.value.name == STREAM_PREFILL


async def test_consumers_count_once_across_list_pages(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    worker_ids = [f"prefill-{i:03d}" for i in range(260)]  # the server lists 256 a page
    await ensure_prefill_queue(js, SHORT, worker_ids=worker_ids)
    for worker_id in ("prefill-000", "prefill-250", "prefill-255", "prefill-259"):
        await publish_job(js, make_job(f"req-{worker_id}"), prefill_worker_id=worker_id)
    await publish_job(js, make_job("req-shared"))
    assert await prefill_queue_depth(js, SHORT) == 5
