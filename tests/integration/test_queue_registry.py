"""Worker registry, policy store and stats subjects on a real broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import InvalidKVValue, InvalidSubjectToken, PolicyConflict
from splitserve.queue.messages import WorkerStats
from splitserve.queue.policy import PolicyStore
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings
from splitserve.queue.stats import StatsSubscription, publish_stats
from splitserve.queue.subjects import stats_subject

pytestmark = pytest.mark.timeout(30)

# TTL 1 s: heartbeats every 1/3 s; an entry without them is gone in ~1-2 s.
FAST = BucketSettings(worker_ttl_s=1.0, worker_marker_ttl_s=5.0, policy_history=3)

Event = tuple[str, bytes | None]


@pytest.fixture
async def registry(nats_conn: BrokerConnection) -> AsyncIterator[WorkerRegistry]:
    reg = await WorkerRegistry.open(nats_conn.js, FAST)
    yield reg
    await reg.close()


async def next_event(events: AsyncIterator[Event], timeout_s: float = 5.0) -> Event:
    return await asyncio.wait_for(events.__anext__(), timeout_s)


async def test_register_get_list(registry: WorkerRegistry) -> None:
    assert await registry.get("decode-0") is None
    assert await registry.list() == {}
    rev_a = await registry.register("decode-0", b"descriptor-a")
    await registry.register("prefill-0", b"descriptor-p")
    assert await registry.get("decode-0") == b"descriptor-a"
    assert await registry.list() == {"decode-0": b"descriptor-a", "prefill-0": b"descriptor-p"}

    rev_b = await registry.register("decode-0", b"descriptor-b")  # replaces
    assert rev_b > rev_a
    assert await registry.get("decode-0") == b"descriptor-b"

    with pytest.raises(InvalidSubjectToken):
        await registry.register("decode.0", b"x")
    with pytest.raises(InvalidKVValue):
        await registry.register("decode-1", b"")


async def test_heartbeat_keeps_a_worker_and_ttl_expires_a_silent_one(
        registry: WorkerRegistry) -> None:
    await registry.register("alive", b"a")
    await registry.register("silent", b"s")
    events = registry.watch()
    assert {await next_event(events), await next_event(events)} == {("alive", b"a"),
                                                                    ("silent", b"s")}
    await registry.stop_heartbeat("silent")
    stopped_at = time.monotonic()

    # Heartbeats re-put the same bytes: the watch reports only the expiry.
    assert await next_event(events, timeout_s=5.0) == ("silent", None)
    assert time.monotonic() - stopped_at >= 0.5
    assert await registry.get("silent") is None

    await asyncio.sleep(1.5)  # 1.5 TTLs after the last put of "alive" without heartbeats
    assert await registry.list() == {"alive": b"a"}
    await events.aclose()


async def test_deregister_removes_at_once_and_watch_sees_put_and_delete(
        registry: WorkerRegistry, nats_conn: BrokerConnection) -> None:
    await registry.register("decode-0", b"d0")
    events = registry.watch()
    assert await next_event(events) == ("decode-0", b"d0")  # existing workers first

    other = await WorkerRegistry.open(nats_conn.js, FAST)
    await other.register("prefill-0", b"p0")
    assert await next_event(events, timeout_s=0.5) == ("prefill-0", b"p0")
    await other.register("prefill-0", b"p0-v2")
    assert await next_event(events, timeout_s=0.5) == ("prefill-0", b"p0-v2")

    await other.deregister("prefill-0")
    # Well before the 1 s TTL could have removed it.
    assert await next_event(events, timeout_s=0.5) == ("prefill-0", None)
    assert await registry.get("prefill-0") is None
    assert await registry.list() == {"decode-0": b"d0"}
    await events.aclose()
    await other.close()


async def test_policy_is_versioned_with_compare_and_set(nats_conn: BrokerConnection) -> None:
    store = await PolicyStore.open(nats_conn.js, FAST)
    assert await store.get("routing.thresholds") is None
    rev1 = await store.put("routing.thresholds", b"v1", expected_revision=0)
    with pytest.raises(PolicyConflict) as info:
        await store.put("routing.thresholds", b"other", expected_revision=0)
    assert info.value.current_revision == rev1

    rev2 = await store.put("routing.thresholds", b"v2", expected_revision=rev1)
    with pytest.raises(PolicyConflict):
        await store.put("routing.thresholds", b"stale", expected_revision=rev1)
    entry = await store.get("routing.thresholds")
    assert entry is not None and (entry.value, entry.revision) == (b"v2", rev2)

    for i in range(3, 6):
        await store.put("routing.thresholds", f"v{i}".encode())
    history = await store.history("routing.thresholds")
    assert [e.value for e in history] == [b"v3", b"v4", b"v5"]  # policy_history = 3
    assert [e.revision for e in history] == sorted(e.revision for e in history)
    assert await store.history("routing.never_written") == []
    await store.delete("routing.thresholds")
    assert [e.value for e in await store.history("routing.thresholds")] == [b"v4", b"v5", None]

    with pytest.raises(InvalidKVValue):
        await store.put("routing thresholds", b"x")


async def test_policy_watch_sees_current_value_then_changes(nats_conn: BrokerConnection) -> None:
    store = await PolicyStore.open(nats_conn.js, FAST)
    await store.put("qos.interactive", b"slo=200ms")
    watch = store.watch()
    first = await asyncio.wait_for(watch.__anext__(), 5.0)
    assert (first.key, first.value, first.initial) == ("qos.interactive", b"slo=200ms", True)

    rev = await store.put("qos.interactive", b"slo=150ms")
    changed = await asyncio.wait_for(watch.__anext__(), 5.0)
    assert (changed.value, changed.revision, changed.initial) == (b"slo=150ms", rev, False)
    await store.delete("qos.interactive")
    deleted = await asyncio.wait_for(watch.__anext__(), 5.0)
    assert (deleted.key, deleted.value) == ("qos.interactive", None)
    assert await store.get("qos.interactive") is None
    assert await store.items() == {}
    await watch.aclose()


async def test_stats_roundtrip_filter_and_malformed(nats_conn: BrokerConnection) -> None:
    decode_only = await StatsSubscription.subscribe(nats_conn.nc, role="decode")
    everything = await StatsSubscription.subscribe(nats_conn.nc)
    stats = WorkerStats(worker_id="decode-0", role="decode", tokens_per_s=812.5, queue_depth=3,
                        num_kv_pages_used=100, num_kv_pages_free=900,
                        num_kv_pages_quarantined=4, ttft_p50_ms=40.0, ttft_p99_ms=180.0,
                        itl_p50_ms=11.0, itl_p99_ms=25.0, num_local_prefills=7,
                        num_remote_prefills=5, num_rejects=1, timestamp_unix_ns=time.time_ns())
    prefill = WorkerStats(worker_id="prefill-0", role="prefill", tokens_per_s=5000.0)

    await nats_conn.nc.publish(stats_subject("decode", "decode-1"), b"\xff garbage")
    assert await publish_stats(nats_conn.nc, prefill)
    assert await publish_stats(nats_conn.nc, stats)

    assert await decode_only.next(timeout_s=2.0) == stats
    assert decode_only.num_malformed == 1
    assert [await everything.next(timeout_s=2.0) for _ in range(2)] == [prefill, stats]
    with pytest.raises(asyncio.TimeoutError):
        await decode_only.next(timeout_s=0.2)
    await decode_only.close()
    await everything.close()
