"""router/pool.py's choice: who is eligible, what a worker costs (fresh stats vs the
router's own counts), ties in turn. Backends get channels that never connect."""

from __future__ import annotations

import time

import grpc
import pytest

from splitserve.client import PLAINTEXT
from splitserve.config.router import RouterConfig
from splitserve.config.schema import from_mapping
from splitserve.errors import ConfigError
from splitserve.queue.messages import WorkerStats
from splitserve.router.pool import Backend, DecodePool, load_cost
from splitserve.rpc import generation_pb2_grpc


def backend(worker_id: str, **fields: object) -> Backend:
    channel = grpc.aio.insecure_channel("127.0.0.1:9")
    b = Backend(worker_id, "127.0.0.1:9", "inc", 4, channel,
                generation_pb2_grpc.GenerationStub(channel), serving=True)
    for name, value in fields.items():
        setattr(b, name, value)
    return b


def pool_of(*backends: Backend) -> DecodePool:
    pool = DecodePool(PLAINTEXT, stats_max_age_s=5.0, unavailable_backoff_s=5.0)
    pool.backends = {b.worker_id: b for b in backends}
    return pool


def stats(queue_depth: int, used: int, free: int) -> WorkerStats:
    return WorkerStats(worker_id="w", role="decode", queue_depth=queue_depth,
                       num_kv_pages_used=used, num_kv_pages_free=free)


async def test_cost_uses_fresh_stats_and_ignores_stale_ones() -> None:
    now = time.monotonic()
    b = backend("a", open_by_class=[0, 1, 0], stats=stats(4, 50, 50), stats_at=now)
    assert load_cost(b, now, 5.0) == 4 + 3 * 0.5
    assert load_cost(b, now + 6.0, 5.0) == 1.0  # stale: only the router's count


async def test_the_cheapest_eligible_worker_wins() -> None:
    now = time.monotonic()
    busy = backend("busy", open_by_class=[0, 3, 0])
    full = backend("full", stats=stats(0, 90, 10), stats_at=now)  # cost 2.7
    idle = backend("idle")
    down = backend("down", serving=False)
    backoff = backend("backoff", unavailable_until=now + 60)
    pool = pool_of(busy, full, idle, down, backoff)
    assert pool.choose().worker_id == "idle"
    assert pool.choose(exclude={"idle"}).worker_id == "full"
    assert pool.choose(exclude={"idle", "full", "busy"}) is None
    assert pool.num_eligible() == 3


async def test_a_request_counts_the_requests_it_would_queue_behind() -> None:
    """As the workers' engines order them: a high request overtakes every lower-class
    one (it takes a running one's place), a normal one only the low ones not started
    (waiting), a low one nobody; a queue deeper than the router's own count (other
    routers' requests, class unknown) counts for every class."""
    now = time.monotonic()
    lows = backend("lows", open_by_class=[0, 0, 6])  # six low requests decoding there
    highs = backend("highs", open_by_class=[2, 0, 0])  # two high ones
    pool = pool_of(lows, highs)
    assert pool.choose(priority="high").worker_id == "lows"
    assert pool.choose(priority="normal").worker_id == "highs"  # lows hold their places
    assert pool.choose(priority="low").worker_id == "highs"
    assert load_cost(lows, now, 5.0, priority="high") == 0.0
    assert load_cost(lows, now, 5.0, priority="normal") == 6.0
    lows.unstarted_by_class = [0, 0, 5]  # five of them still wait for their first token
    assert load_cost(lows, now, 5.0, priority="normal") == 1.0
    assert pool.choose(priority="normal").worker_id == "lows"
    assert load_cost(lows, now, 5.0, priority="low") == 6.0
    lows.stats, lows.stats_at = stats(9, 0, 100), now  # 3 more than this router's 6
    assert load_cost(lows, now, 5.0, priority="high") == 3.0
    assert pool.choose(priority="high").worker_id == "highs"


async def test_a_calls_counts_follow_it_from_sending_to_its_end() -> None:
    b = backend("a")
    high, normal = b.sent(10, "high", 0.0), b.sent(20, "", 0.0)  # no priority: normal
    low = b.sent(30, "low", 0.0)
    assert (b.active, b.open_by_class, b.unstarted_by_class) == (3, [1, 1, 1], [1, 1, 1])
    assert b.ttft.pending == [10, 20, 30]
    assert b.open_ahead("normal") == 2  # overtakes the low one while it waits ...
    b.first_token(low, 0.5)
    assert b.open_ahead("normal") == 3  # ... not once it runs: it keeps its place
    b.ended(low, started=True)
    b.ended(high, started=False)  # failed or cancelled before its first token
    assert (b.active, b.open_by_class, b.unstarted_by_class) == (1, [0, 1, 0], [0, 1, 0])
    assert b.ttft.pending == [0, 20, 0]
    b.ended(normal, started=False)
    assert (b.active, b.ttft.pending) == (0, [0, 0, 0])


async def test_ties_go_in_turn_and_unavailable_takes_a_worker_out() -> None:
    a, b = backend("a"), backend("b")
    pool = pool_of(a, b)
    assert {pool.choose().worker_id for _ in range(4)} == {"a", "b"}
    pool.mark_unavailable(a)
    assert {pool.choose().worker_id for _ in range(4)} == {"b"}


@pytest.mark.parametrize("settings, message", [
    ({"keepalive_s": 0.5}, "keepalive_s: must be in \\[1, 3600\\], got 0.5"),
    ({"keepalive_s": -1.0}, "keepalive_s: must be in"),
    ({"keepalive_timeout_s": 0.0}, "keepalive_timeout_s: must be in \\(0, 600\\]"),
])
def test_keepalive_settings_are_checked(settings: dict, message: str) -> None:
    assert RouterConfig().keepalive_s == 10.0  # on by default
    assert from_mapping(RouterConfig, {"keepalive_s": 0.0}).keepalive_s == 0.0  # off
    with pytest.raises(ConfigError, match=message):
        from_mapping(RouterConfig, settings)
