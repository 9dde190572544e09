"""Publish, pull and settle prefill jobs on a real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import pytest

from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import (
    DuplicateJob,
    JobAlreadySettled,
    MalformedMessage,
    PublishFailed,
)
from splitserve.queue.messages import PrefillJob
from splitserve.queue.settings import PrefillQueueSettings
from splitserve.queue.streams import (
    direct_consumer_config,
    ensure_prefill_queue,
    shared_consumer_config,
)
from splitserve.queue.subjects import STREAM_PREFILL, shared_subject
from splitserve.queue.work_queue import JobConsumer, publish_job

pytestmark = pytest.mark.timeout(30)

SHORT = PrefillQueueSettings(ack_wait_s=1.0, max_deliver=5)


def make_job(request_id: str, attempt: int = 1, priority: str = "high") -> PrefillJob:
    return PrefillJob(
        request_id=request_id, attempt=attempt, token_ids=[1, 15043, 29892, 3186, 29991],
        sampling=PrefillJob.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=0,
                                           max_tokens=64, stop_token_ids=[2, 32000]),
        priority=priority, dest_worker_id="decode-0", dest_page_ids=[7, 8, 9],
        num_cached_tokens=2, lease_deadline_unix_ns=time.time_ns() + 30 * 10**9,
        trace_id="trace-1",
    )


async def num_stored(conn: BrokerConnection) -> int:
    return int((await conn.js.stream_info(STREAM_PREFILL)).state.messages)


@pytest.fixture
async def high(nats_conn: BrokerConnection) -> AsyncIterator[JobConsumer]:
    await ensure_prefill_queue(nats_conn.js, SHORT)
    consumer = await JobConsumer.bind(nats_conn.js, shared_consumer_config("high", SHORT))
    yield consumer
    await consumer.close()


async def test_publish_pull_ack_roundtrip(nats_conn: BrokerConnection, high: JobConsumer) -> None:
    job = make_job("req-1")
    before_ns = time.time_ns()
    seq = await publish_job(nats_conn.js, job)
    assert seq == 1

    [delivery] = await high.fetch(max_jobs=4, timeout_s=2.0)
    got = delivery.job
    assert got.publish_time_unix_ns >= before_ns
    got.publish_time_unix_ns = 0
    assert got == job
    assert got.sampling.HasField("seed") and got.sampling.seed == 0
    assert list(got.sampling.stop_token_ids) == [2, 32000]
    assert (delivery.num_delivered, delivery.stream_seq) == (1, 1)
    now_ns = job.lease_deadline_unix_ns - 3 * 10**9
    assert delivery.lease_remaining_s(margin_s=0.5, now_unix_ns=now_ns) == pytest.approx(2.5)
    assert delivery.lease_remaining_s(margin_s=4.0, now_unix_ns=now_ns) < 0

    assert await delivery.ack()
    assert await num_stored(nats_conn) == 0  # work-queue retention: acked jobs leave
    assert await high.fetch(max_jobs=4, timeout_s=0.3) == []
    with pytest.raises(JobAlreadySettled):
        await delivery.nak()


async def test_same_attempt_is_stored_once_and_a_new_attempt_separately(
        nats_conn: BrokerConnection, high: JobConsumer) -> None:
    first = await publish_job(nats_conn.js, make_job("req-1"))
    # A first try answered "duplicate" was stored by someone else: not this job.
    with pytest.raises(DuplicateJob) as info:
        await publish_job(nats_conn.js, make_job("req-1"))
    assert isinstance(info.value, PublishFailed)
    assert (info.value.request_id, info.value.attempt, info.value.stream_seq) == ("req-1", 1, first)
    assert await num_stored(nats_conn) == 1
    second = await publish_job(nats_conn.js, make_job("req-1", attempt=2))
    assert second != first
    assert await num_stored(nats_conn) == 2

    deliveries = await high.fetch_batch(max_jobs=8, timeout_s=2.0, window_s=0.3)
    assert [(d.request_id, d.job.attempt) for d in deliveries] == [("req-1", 1), ("req-1", 2)]


async def test_direct_jobs_reach_only_that_worker(nats_conn: BrokerConnection,
                                                   high: JobConsumer) -> None:
    direct = await JobConsumer.bind(nats_conn.js, direct_consumer_config("prefill-1", SHORT))
    await publish_job(nats_conn.js, make_job("req-d"), prefill_worker_id="prefill-1")
    assert await high.fetch(max_jobs=4, timeout_s=0.3) == []
    [delivery] = await direct.fetch(max_jobs=4, timeout_s=2.0)
    assert delivery.request_id == "req-d"
    await delivery.ack()
    await direct.close()


async def test_nak_with_delay_redelivers_after_the_delay(nats_conn: BrokerConnection,
                                                         high: JobConsumer) -> None:
    await publish_job(nats_conn.js, make_job("req-1"))
    [delivery] = await high.fetch(max_jobs=1, timeout_s=2.0)
    nak_at = time.monotonic()
    assert await delivery.nak(delay_s=0.7)
    assert await high.fetch(max_jobs=1, timeout_s=0.4) == []
    [again] = await high.fetch(max_jobs=1, timeout_s=3.0)
    assert time.monotonic() - nak_at >= 0.6
    assert again.request_id == "req-1" and again.num_delivered == 2
    await again.ack()


async def test_term_never_redelivers(nats_conn: BrokerConnection, high: JobConsumer) -> None:
    await publish_job(nats_conn.js, make_job("req-1"))
    [delivery] = await high.fetch(max_jobs=1, timeout_s=2.0)
    assert await delivery.term()
    # Longer than AckWait (1 s): an unsettled job would be back by now.
    assert await high.fetch(max_jobs=1, timeout_s=1.8) == []
    assert await num_stored(nats_conn) == 0


async def test_unacked_job_is_redelivered_after_ack_wait(nats_conn: BrokerConnection,
                                                         high: JobConsumer) -> None:
    await publish_job(nats_conn.js, make_job("req-1"))
    [_unacked] = await high.fetch(max_jobs=1, timeout_s=2.0)
    fetched_at = time.monotonic()
    [again] = await high.fetch(max_jobs=1, timeout_s=4.0)
    assert time.monotonic() - fetched_at >= 0.9
    assert again.request_id == "req-1" and again.num_delivered == 2
    assert await again.ack()
    assert await num_stored(nats_conn) == 0


async def test_in_progress_extends_ack_wait(nats_conn: BrokerConnection,
                                            high: JobConsumer) -> None:
    await publish_job(nats_conn.js, make_job("req-1"))
    [delivery] = await high.fetch(max_jobs=1, timeout_s=2.0)

    async def heartbeat() -> None:
        while True:
            assert await delivery.in_progress()
            await asyncio.sleep(0.3)

    beats = asyncio.create_task(heartbeat())
    try:
        # 2.5 AckWaits: without the heartbeat it would have been redelivered twice.
        assert await high.fetch(max_jobs=1, timeout_s=2.5) == []
    finally:
        beats.cancel()
    stopped_at = time.monotonic()
    [again] = await high.fetch(max_jobs=1, timeout_s=4.0)
    assert time.monotonic() - stopped_at >= 0.5
    assert again.num_delivered == 2
    await again.ack()


async def test_max_deliver_stops_redelivery(nats_conn: BrokerConnection) -> None:
    settings = dataclasses.replace(SHORT, max_deliver=2)
    await ensure_prefill_queue(nats_conn.js, settings)
    consumer = await JobConsumer.bind(nats_conn.js, shared_consumer_config("normal", settings))
    await publish_job(nats_conn.js, make_job("req-poison", priority="normal"))
    counts = []
    for _ in range(2):
        [delivery] = await consumer.fetch(max_jobs=1, timeout_s=2.0)
        counts.append(delivery.num_delivered)
        await delivery.nak()
    assert counts == [1, 2]
    assert await consumer.fetch(max_jobs=1, timeout_s=1.5) == []
    await consumer.close()


async def test_malformed_payloads_are_terminated_and_the_consumer_continues(
        nats_conn: BrokerConnection, high: JobConsumer,
        caplog: pytest.LogCaptureFixture) -> None:
    subject = shared_subject("high")
    await nats_conn.js.publish(subject, b"\xff\xfe not a protobuf")
    no_pages = make_job("req-bad")
    del no_pages.dest_page_ids[:]
    await nats_conn.js.publish(subject, no_pages.SerializeToString())
    await publish_job(nats_conn.js, make_job("req-good"))

    with caplog.at_level(logging.ERROR, logger="splitserve.queue.work_queue"):
        deliveries = await high.fetch_batch(max_jobs=8, timeout_s=2.0, window_s=0.3)
    assert [d.request_id for d in deliveries] == ["req-good"]
    malformed = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(malformed) == 2 and "seq 1" in malformed[0] and "dest_page_ids" in malformed[1]

    await deliveries[0].ack()
    # Terminated, not pending: nothing comes back after AckWait.
    assert await high.fetch(max_jobs=8, timeout_s=1.5) == []
    assert await num_stored(nats_conn) == 0


async def test_invalid_job_is_refused_before_publishing(nats_conn: BrokerConnection,
                                                        high: JobConsumer) -> None:
    job = make_job("req-1")
    job.num_cached_tokens = len(job.token_ids)
    with pytest.raises(MalformedMessage) as info:
        await publish_job(nats_conn.js, job)
    assert "num_cached_tokens" in info.value.reason
    assert await num_stored(nats_conn) == 0


async def test_batch_window_collects_jobs_published_meanwhile(nats_conn: BrokerConnection,
                                                              high: JobConsumer) -> None:
    await publish_job(nats_conn.js, make_job("req-0"))

    async def publish_late() -> None:
        await asyncio.sleep(0.1)
        await publish_job(nats_conn.js, make_job("req-1"))

    late = asyncio.create_task(publish_late())
    start = time.monotonic()
    batch = await high.fetch_batch(max_jobs=2, timeout_s=2.0, window_s=1.0)
    await late
    assert [d.request_id for d in batch] == ["req-0", "req-1"]
    assert time.monotonic() - start < 0.9  # returned once the batch was full
    assert await high.num_pending() == 0
    for delivery in batch:
        await delivery.ack()
