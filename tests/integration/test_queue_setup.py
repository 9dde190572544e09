"""Names, validation, the broker process, connecting, and idempotent setup."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest
from nats.js import api
from nats_fixtures import TEST_BACKOFF

from splitserve.errors import ConfigError
from splitserve.queue import subjects
from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.connection import BrokerConnection, _cancel_until_done, connect
from splitserve.queue.errors import (
    BrokerStartError,
    BrokerUnavailable,
    ConfigMismatch,
    InvalidSubjectToken,
    QueueSetupError,
)
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.streams import (
    direct_consumer_config,
    ensure_consumer,
    ensure_messaging,
    ensure_prefill_stream,
    ensure_workers_bucket,
)
from splitserve.queue.subjects import STREAM_PREFILL

pytestmark = pytest.mark.timeout(30)


def test_subject_and_bucket_names() -> None:
    assert subjects.STREAM_PREFILL == "SPLITSERVE_PREFILL"
    assert subjects.shared_subject("high") == "splitserve.prefill.shared.high"
    assert subjects.direct_subject("prefill-0") == "splitserve.prefill.direct.prefill-0"
    assert subjects.stats_subject("decode", "d_1") == "splitserve.stats.decode.d_1"
    assert subjects.stats_filter() == "splitserve.stats.*.*"
    assert subjects.stats_filter(role="prefill") == "splitserve.stats.prefill.*"
    assert subjects.shared_consumer_name("low") == "shared-low"
    assert subjects.direct_consumer_name("p1") == "direct-p1"
    assert (subjects.BUCKET_WORKERS, subjects.BUCKET_POLICY) == (
        "splitserve-workers", "splitserve-policy")


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "empty"), ("a.b", "'.'"), ("gpu*", "'*'"), ("all>", "'>'"), (">", "'>'"),
     ("a b", "whitespace"), ("a\tb", "whitespace"), ("w\n", "whitespace"),
     ("wörker", "only letters"), ("a/b", "only letters"), ("x" * 129, "longer")],
)
def test_invalid_tokens_are_rejected_with_reason(value: str, reason: str) -> None:
    for make, kind in ((subjects.direct_subject, "worker id"),
                       (subjects.shared_subject, "priority"),
                       (lambda v: subjects.stats_subject(v, "w1"), "role")):
        with pytest.raises(InvalidSubjectToken) as info:
            make(value)
        assert info.value.kind == kind
        assert info.value.value == value
        assert reason in info.value.reason


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        PrefillQueueSettings(max_age_s=60.0, duplicate_window_s=120.0)
    assert info.value.field == "queue.max_age_s"
    with pytest.raises(InvalidSubjectToken):
        PrefillQueueSettings(priorities=("high", "low.latency"))
    with pytest.raises(ConfigError):
        PrefillQueueSettings(priorities=("high", "high"))
    with pytest.raises(ConfigError):
        BucketSettings(worker_ttl_s=0.5)


def test_broker_restarts_on_same_port_and_refuses_a_taken_port(
        nats_server: NatsServer, tmp_path: Path) -> None:
    port, pid = nats_server.port, nats_server.pid
    nats_server.stop()
    assert not nats_server.is_running
    nats_server.start()
    assert nats_server.is_running and nats_server.port == port and nats_server.pid != pid

    with pytest.raises(BrokerStartError) as info:
        NatsServer(port, tmp_path / "other").start()
    assert "already in use" in str(info.value)


def test_broker_start_failure_reports_last_log_lines(
        nats_server: NatsServer, tmp_path: Path) -> None:
    # The monitoring port is taken, so nats-server exits during startup.
    failing = NatsServer(find_free_port(), tmp_path / "failing", monitor_port=nats_server.port)
    with pytest.raises(BrokerStartError) as info:
        failing.start()
    assert "exited with code" in info.value.reason
    assert any("monitor" in line for line in info.value.stderr_tail)
    assert not failing.is_running


async def test_connect_waits_for_a_late_broker(tmp_path: Path) -> None:
    server = NatsServer(find_free_port(), tmp_path / "store")
    with pytest.raises(BrokerUnavailable) as info:
        await connect(server.url, backoff=TEST_BACKOFF, connect_timeout_s=0.3)
    assert info.value.servers == (server.url,)

    pending = asyncio.create_task(connect(server.url, backoff=TEST_BACKOFF, connect_timeout_s=10))
    await asyncio.sleep(0.3)
    assert not pending.done()
    await asyncio.to_thread(server.start)
    try:
        conn = await asyncio.wait_for(pending, 5)
        assert conn.is_connected
        await conn.close()
        assert conn.is_closed and not conn.is_connected
    finally:
        server.stop()


async def test_a_connect_attempt_ends_even_when_it_swallows_a_cancel() -> None:
    """nats.py's first-connect loop can lose one cancel (an inner wait_for whose read
    completes as the cancel arrives); seen as a connect with wrong credentials that
    never timed out, 1 in ~30. The attempt is cancelled until it ends."""
    cancels = 0

    async def deaf_once() -> None:  # swallows the first cancel, as that read did
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels > 1:
                    raise

    attempt = asyncio.ensure_future(deaf_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(_cancel_until_done(attempt), 2)
    assert attempt.cancelled() and cancels == 2


async def test_a_cancelled_connect_leaves_no_attempt_behind(tmp_path: Path) -> None:
    server = NatsServer(find_free_port(), tmp_path / "store")  # never started
    before = asyncio.all_tasks()
    pending = asyncio.create_task(connect(server.url, backoff=TEST_BACKOFF, connect_timeout_s=30))
    await asyncio.sleep(0.3)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.sleep(0.05)  # the closed client's own tasks wind down
    assert asyncio.all_tasks() - before == set()


async def test_setup_is_idempotent_with_the_asked_settings(
        nats_conn: BrokerConnection, caplog: pytest.LogCaptureFixture) -> None:
    js = nats_conn.js
    queue, buckets = PrefillQueueSettings(), BucketSettings()
    await ensure_messaging(js, queue, buckets)
    await ensure_consumer(js, direct_consumer_config("p1", queue))
    first = await js.stream_info(STREAM_PREFILL)
    with caplog.at_level(logging.INFO, logger="splitserve.queue.streams"):
        await ensure_messaging(js, queue, buckets)
        await ensure_consumer(js, direct_consumer_config("p1", queue))
    assert not [r for r in caplog.records if r.name == "splitserve.queue.streams"]

    info = await js.stream_info(STREAM_PREFILL)
    assert info.created == first.created
    cfg = info.config
    assert cfg.retention == api.RetentionPolicy.WORK_QUEUE
    assert cfg.storage == api.StorageType.FILE
    assert sorted(cfg.subjects or []) == ["splitserve.prefill.direct.*",
                                          "splitserve.prefill.shared.*"]
    assert cfg.duplicate_window == 120.0 and cfg.max_age == 900.0

    consumers = {c.name: c.config for c in await js.consumers_info(STREAM_PREFILL)}
    assert sorted(consumers) == ["direct-p1", "shared-high", "shared-low", "shared-normal"]
    assert consumers["shared-high"].filter_subject == "splitserve.prefill.shared.high"
    assert consumers["direct-p1"].filter_subject == "splitserve.prefill.direct.p1"
    for config in consumers.values():
        assert config.durable_name is not None
        assert config.ack_policy == api.AckPolicy.EXPLICIT
        assert config.ack_wait == 30.0 and config.max_deliver == 5

    workers = (await js.stream_info("KV_splitserve-workers")).config
    assert workers.max_age == 15.0 and workers.max_msgs_per_subject == 1
    policy = (await js.stream_info("KV_splitserve-policy")).config
    assert policy.max_age == 0.0 and policy.max_msgs_per_subject == 5


async def test_mutable_differences_are_updated_in_place(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    queue = PrefillQueueSettings()
    await ensure_messaging(js, queue, BucketSettings())
    await ensure_consumer(js, direct_consumer_config("p1", queue))

    changed = dataclasses.replace(queue, max_age_s=600.0, ack_wait_s=5.0, max_deliver=3)
    await ensure_prefill_stream(js, changed)
    await ensure_consumer(js, direct_consumer_config("p1", changed))
    await ensure_workers_bucket(js, BucketSettings(worker_ttl_s=4.0))

    assert (await js.stream_info(STREAM_PREFILL)).config.max_age == 600.0
    consumer = (await js.consumer_info(STREAM_PREFILL, "direct-p1")).config
    assert (consumer.ack_wait, consumer.max_deliver) == (5.0, 3)
    assert (await js.stream_info("KV_splitserve-workers")).config.max_age == 4.0


async def test_immutable_difference_raises_naming_the_setting(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    await js.add_stream(name=STREAM_PREFILL, subjects=["splitserve.prefill.>"],
                        retention=api.RetentionPolicy.LIMITS, storage=api.StorageType.FILE)
    with pytest.raises(ConfigMismatch) as info:
        await ensure_prefill_stream(js, PrefillQueueSettings())
    err = info.value
    assert err.kind == "stream" and err.name == STREAM_PREFILL
    assert err.settings["retention"] == ("limits", "workqueue")
    assert "retention" in str(err) and "workqueue" in err.reason

    await js.create_key_value(bucket="splitserve-workers", ttl=15.0,
                              storage=api.StorageType.MEMORY)
    with pytest.raises(ConfigMismatch) as info:
        await ensure_workers_bucket(js, BucketSettings())
    assert "storage" in info.value.settings


async def test_overlapping_consumer_is_a_setup_error(nats_conn: BrokerConnection) -> None:
    js = nats_conn.js
    queue = PrefillQueueSettings()
    await ensure_prefill_stream(js, queue)
    # A work-queue stream allows each message to one consumer only.
    await js.add_consumer(STREAM_PREFILL, durable_name="catch-all",
                          filter_subject="splitserve.prefill.shared.>")
    with pytest.raises(QueueSetupError) as info:
        await ensure_consumer(js, direct_consumer_config("p1", queue).evolve(
            filter_subject="splitserve.prefill.shared.high"))
    assert info.value.name == "direct-p1"
