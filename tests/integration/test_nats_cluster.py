"""A 3-node JetStream cluster on localhost: the prefill queue and the buckets keep 3
replicas, and losing the node that leads them (and holds the client) loses no job."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats_fixtures import TEST_BACKOFF
from test_queue_work import make_job

from splitserve.config.daemon import ClusterConfig
from splitserve.daemons.up import LocalCluster
from splitserve.errors import ConfigError
from splitserve.queue.cluster import NatsCluster, free_node_ports
from splitserve.queue.connection import BrokerConnection, connect
from splitserve.queue.errors import BrokerStartError
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.streams import ensure_messaging, shared_consumer_config
from splitserve.queue.subjects import BUCKET_POLICY, BUCKET_WORKERS, STREAM_PREFILL
from splitserve.queue.work_queue import JobConsumer, publish_job

pytestmark = pytest.mark.timeout(90)

logger = logging.getLogger(__name__)

SETTINGS = PrefillQueueSettings(ack_wait_s=2.0, replicas=3)
BUCKETS = BucketSettings(replicas=3)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    # Another process may take one of the 9 free ports before a node binds it.
    for attempt in range(3):
        nats = NatsCluster(free_node_ports(3), tmp_path / f"nats-{attempt}")
        try:
            nats.start()
        except BrokerStartError:
            if attempt == 2:
                raise
            continue
        try:
            yield nats
        finally:
            nats.stop()
        return


async def _leader(conn: BrokerConnection, consumer: str | None,
                  stream: str = STREAM_PREFILL) -> str | None:
    try:
        info = (await conn.js.stream_info(stream) if consumer is None else
                await conn.js.consumer_info(stream, consumer, timeout=0.5))
    except Exception:  # noqa: BLE001 - no leader for a moment during a move
        return None
    return None if info.cluster is None else info.cluster.leader


async def _move_leaders_to(conn: BrokerConnection, server_name: str, within_s: float,
                           stream: str = STREAM_PREFILL,
                           consumers: tuple[str, ...] = ("shared-high",)) -> None:
    """Make `server_name` lead `stream` and its `consumers`."""
    for consumer in (None, *consumers):
        if await _leader(conn, consumer, stream) == server_name:
            continue
        subject = ("$JS.API.STREAM.LEADER.STEPDOWN." + stream if consumer is None else
                   f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}")
        body = json.dumps({"placement": {"preferred": server_name}}).encode()
        reply = json.loads((await conn.nc.request(subject, body, timeout=5.0)).data)
        assert reply.get("success"), reply
        deadline = time.monotonic() + within_s
        while await _leader(conn, consumer, stream) != server_name:
            assert time.monotonic() < deadline, f"{consumer or stream} did not move"
            await asyncio.sleep(0.1)


def _connected_node(conn: BrokerConnection, cluster: NatsCluster) -> int:
    assert conn.nc.connected_url is not None
    return [n.port for n in cluster.nodes].index(conn.nc.connected_url.port)


async def _collect(consumer: JobConsumer, num_jobs: int, within_s: float) -> set[str]:
    """Fetch and ack until `num_jobs` distinct requests were acked. An ack still
    unanswered after its retries returns False: that job comes back after AckWait."""
    acked: set[str] = set()
    deadline = time.monotonic() + within_s
    while len(acked) < num_jobs and time.monotonic() < deadline:
        for delivery in await consumer.fetch(max_jobs=num_jobs, timeout_s=0.5):
            if await delivery.ack():
                acked.add(delivery.request_id)
    return acked


async def test_queue_survives_the_loss_of_its_leader_node(cluster: NatsCluster) -> None:
    conn = await connect(cluster.urls, name="test", backoff=TEST_BACKOFF, connect_timeout_s=5.0)
    js = conn.js
    try:
        await ensure_messaging(js, SETTINGS, BUCKETS)
        for stream in (STREAM_PREFILL, f"KV_{BUCKET_WORKERS}", f"KV_{BUCKET_POLICY}"):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        consumer = await JobConsumer.bind(js, shared_consumer_config("high", SETTINGS))
        before = [f"before-{i}" for i in range(5)]
        for request_id in before:
            await publish_job(js, make_job(request_id))

        # The hardest single loss: the node leading the stream and the consumer,
        # which is also the one this client is connected to.
        victim = _connected_node(conn, cluster)
        victim_name = cluster.nodes[victim].server_name
        await _move_leaders_to(conn, victim_name, within_s=10.0)
        cluster.kill(victim)
        killed_at = time.monotonic()

        after = [f"after-{i}" for i in range(5)]
        await publish_job(js, make_job(after[0]), retry_for_s=30.0)
        first_publish_s = time.monotonic() - killed_at
        for request_id in after[1:]:
            await publish_job(js, make_job(request_id), retry_for_s=30.0)
        acked = await _collect(consumer, 10, within_s=40.0)
        drained_s = time.monotonic() - killed_at
        logger.info("after the kill: first publish %.1f s, all 10 acked %.1f s",
                    first_publish_s, drained_s)
        assert acked == set(before + after)  # nothing confirmed before the kill is lost
        info = await js.stream_info(STREAM_PREFILL)
        assert info.cluster is not None and info.cluster.leader != victim_name
        # An ack is confirmed by the consumer's leader; the work-queue stream removes
        # the job once the ack floor reaches it, a moment later (seen: 1 left at once).
        deadline = time.monotonic() + 10.0
        while info.state.messages and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            info = await js.stream_info(STREAM_PREFILL)
        assert info.state.messages == 0, info.state
        assert conn.num_reconnects >= 1

        # The node comes back as the same peer and catches up.
        await asyncio.to_thread(cluster.start_node, victim)
        deadline = time.monotonic() + 20.0
        while True:
            cluster_info = (await js.stream_info(STREAM_PREFILL)).cluster
            assert cluster_info is not None
            peers = {p.name: p.current for p in cluster_info.replicas or []}
            if peers.get(victim_name):
                break
            assert time.monotonic() < deadline, peers
            await asyncio.sleep(0.2)
        await consumer.close()
    finally:
        await conn.close()


async def test_registry_lists_its_workers_through_the_loss_of_its_leader_node(
        cluster: NatsCluster) -> None:
    """What a registry watcher asks after its watch restarted (who left meanwhile):
    answered once a new leader is elected, not an error the watcher would act on
    (the decode worker used to see no prefill worker until its next restart)."""
    conn = await connect(cluster.urls, name="test", backoff=TEST_BACKOFF, connect_timeout_s=5.0)
    try:
        registry = await WorkerRegistry.open(conn.js, BUCKETS)
        await registry.register("prefill-0", b"p0")
        await registry.register("decode-0", b"d0")
        victim = _connected_node(conn, cluster)
        await _move_leaders_to(conn, cluster.nodes[victim].server_name, within_s=10.0,
                               stream=f"KV_{BUCKET_WORKERS}", consumers=())
        cluster.kill(victim)
        killed_at = time.monotonic()
        live = await asyncio.wait_for(registry.live_ids(retry_s=0.2), 40.0)
        logger.info("registry listed %.1f s after its leader's loss",
                    time.monotonic() - killed_at)
        assert live == {"prefill-0", "decode-0"}
        await registry.close()
    finally:
        await conn.close()


def test_up_with_a_3_node_cluster_gives_workers_every_url_and_3_replicas(tmp_path: Path) -> None:
    cluster = ClusterConfig(state_dir=str(tmp_path / "state"), nats_port=14222,
                            nats_cluster_size=3, num_prefill_workers=1)
    local = LocalCluster(cluster)
    assert isinstance(local.nats, NatsCluster)
    assert [(p.client, p.route, p.monitor) for p in local.nats.ports] == [
        (14222 + i, 16222 + i, 18222 + i) for i in range(3)]
    local.write_worker_configs()
    urls = ",".join(f"nats://127.0.0.1:{14222 + i}" for i in range(3))
    assert [(w.config.nats_url, w.config.nats.replicas) for w in local.workers] == [
        (urls, 3), (urls, 3)]
    single = LocalCluster(ClusterConfig(state_dir=str(tmp_path / "one")))
    single.write_worker_configs()
    assert [w.config.nats.replicas for w in single.workers] == [1, 1]
    with pytest.raises(ConfigError) as info:
        ClusterConfig(nats_cluster_size=2)
    assert info.value.field == "nats_cluster_size"


async def test_a_secure_3_node_cluster_needs_a_login_on_every_node(tmp_path: Path) -> None:
    from splitserve.queue.errors import BrokerUnavailable
    from splitserve.queue.policy import PolicyStore

    ports = free_node_ports(3)
    local = LocalCluster(ClusterConfig(state_dir=str(tmp_path / "state"),
                                       nats_port=ports[0].client, nats_cluster_size=3))
    assert isinstance(local.nats, NatsCluster)
    local.nats = NatsCluster(ports, local.state_dir / "nats", log_dir=local.state_dir)
    local.prepare_security()
    assert sorted(local.nats_auth) == ["admin", "decode-0", "planner", "prefill-0", "router"]
    await asyncio.to_thread(local.nats.start)
    try:
        for url in local.nats.urls:
            with pytest.raises(BrokerUnavailable):
                await connect(url, name="anonymous", connect_timeout_s=2)
        conn = await connect(local.nats.url, name="admin", auth=local.nats_auth["admin"],
                             backoff=TEST_BACKOFF, connect_timeout_s=10)
        try:
            store = await PolicyStore.open(conn.js, BUCKETS)
            assert await store.put("routing", b'{"prefill_length_threshold": 64}') >= 1
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(local.nats.stop)


@pytest.mark.parametrize("retry_for_s, acked", [(0.0, False), (15.0, True)])
async def test_an_ack_sent_while_its_consumer_elects_a_leader_is_retried(
        cluster: NatsCluster, retry_for_s: float, acked: bool) -> None:
    # The client's node stays up; the node leading the stream and the consumer dies.
    # Until a new leader is elected nobody answers the ack. Unretried, the job stays
    # ack-pending (counted in the queue depth) until AckWait redelivers it.
    conn = await connect(cluster.urls, name="test", backoff=TEST_BACKOFF, connect_timeout_s=5.0)
    js = conn.js
    settings = PrefillQueueSettings(ack_wait_s=30.0, replicas=3)
    try:
        await ensure_messaging(js, settings, BUCKETS)
        consumer = await JobConsumer.bind(js, shared_consumer_config("high", settings))
        await publish_job(js, make_job("req-ack"))
        [delivery] = await consumer.fetch(max_jobs=1, timeout_s=2.0)
        victim = (_connected_node(conn, cluster) + 1) % 3
        await _move_leaders_to(conn, cluster.nodes[victim].server_name, within_s=10.0)
        cluster.kill(victim)
        assert await delivery.ack(timeout_s=0.5, retry_for_s=retry_for_s) is acked

        deadline = time.monotonic() + 15.0
        while (info := await _consumer_info(conn)) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert info is not None and info.num_ack_pending == (0 if acked else 1)
        await consumer.close()
    finally:
        await conn.close()


async def _consumer_info(conn: BrokerConnection):  # type: ignore[no-untyped-def]
    try:
        return await conn.js.consumer_info(STREAM_PREFILL, "shared-high", timeout=0.5)
    except Exception:  # noqa: BLE001 - no leader yet
        return None
