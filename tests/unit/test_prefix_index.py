"""Prefix-aware routing's parts: the engine's prefix-cache events (exact hashes of a
real tiny engine), their netting on the decode worker, the router's bounded index and
recent-routes memory, and the choice they steer."""

from __future__ import annotations

from dataclasses import replace

from test_router_pool import backend, pool_of

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.page_allocator import page_hashes
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.stats import EMPTY_STATS
from splitserve.queue.messages import KVCacheEvents, decode_kv_events
from splitserve.router.prefix_index import PrefixIndex, RecentRoutes
from splitserve.worker.kv_events import KVEventPublisher


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


def events(worker: str, seq: int, stored=(), removed=(), reset=False,
           incarnation: str = "a") -> KVCacheEvents:
    return KVCacheEvents(worker_id=worker, incarnation=incarnation, seq=seq, page_size=4,
                         reset=reset, stored=list(stored), removed=list(removed))


async def test_a_real_engine_reports_exactly_the_pages_it_caches(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine(page_size=4))
    seen: list[tuple[bool, bytes]] = []
    engine.stats_listeners.append(lambda s: seen.extend(s.kv_events))
    await engine.start()
    try:
        await engine.call(lambda e: e.record_kv_events())
        prompt = list(range(1, 19))  # 18 tokens: 4 full pages of 4
        async for _ in engine.generate("r1", prompt, SamplingParams(max_tokens=1,
                                                                    temperature=0)):
            pass
        await engine.call(lambda e: None)  # one more delivered snapshot
    finally:
        await engine.stop()
    stored = [page_hash for cached, page_hash in seen if cached]
    assert stored[:4] == page_hashes(prompt, 4)
    assert not [page_hash for cached, page_hash in seen if not cached]


def test_the_publisher_nets_changes_and_resets_after_an_overflow() -> None:
    publisher = KVEventPublisher("decode-0", "inc", 4, max_pending=3)
    first = publisher.take()
    assert first is not None and first.reset and first.seq == 1  # a fresh start voids
    assert publisher.take() is None
    publisher.on_stats(replace(EMPTY_STATS, kv_events=(
        (True, h(1)), (True, h(2)), (False, h(1)), (False, h(3)), (True, h(3)))))
    message = publisher.take()
    assert message is not None and not message.reset
    assert (list(message.stored), list(message.removed), message.seq) == (
        [h(2), h(3)], [h(1)], 2)
    assert decode_kv_events(message.SerializeToString()) == message
    publisher.on_stats(replace(EMPTY_STATS, kv_events=tuple((True, h(i)) for i in range(5))))
    message = publisher.take()
    assert message is not None and message.reset and not message.stored
    assert publisher.num_dropped == 5


def test_the_index_follows_events_and_matches_leading_pages() -> None:
    index = PrefixIndex()
    index.apply(events("w1", 1, stored=[h(1), h(2), h(3)]))
    index.apply(events("w2", 1, stored=[h(1), h(9)]))
    assert index.matched_pages([h(1), h(2), h(3), h(4)], ["w1", "w2", "w3"]) == {
        "w1": 3, "w2": 1, "w3": 0}
    index.apply(events("w1", 2, removed=[h(2)]))
    assert index.matched_pages([h(1), h(2), h(3)], ["w1"]) == {"w1": 1}  # 3 is unusable
    index.apply(events("w1", 5, stored=[h(2)]))
    assert index.num_gaps == 2
    index.apply(events("w1", 1, stored=[h(7)], incarnation="b"))  # restarted: forgotten
    assert index.matched_pages([h(1)], ["w1", "w2"]) == {"w1": 0, "w2": 1}
    index.apply(events("w2", 2, reset=True))
    assert index.matched_pages([h(1)], ["w2"]) == {"w2": 0}
    index.forget("w1")
    assert len(index) == 0


def test_memory_is_bounded() -> None:
    index, recent = PrefixIndex(max_entries=100), RecentRoutes(max_entries=50)
    for seq in range(1, 101):
        index.apply(events("w1", seq, stored=[h(seq * 10 + i) for i in range(10)]))
        recent.record([h(seq * 10 + i) for i in range(10)], "w1")
    assert len(index) == 100 and index.num_evicted == 900
    assert len(recent) == 50
    newest = [h(1000 + i) for i in range(10)]
    assert index.matched_pages(newest, ["w1"]) == {"w1": 10}
    assert recent.matched_pages(newest, "w1") == 10
    assert recent.matched_pages([h(10)], "w1") == 0  # forgotten


async def test_the_choice_follows_the_prefix_until_load_outweighs_it() -> None:
    prompt = list(range(40))  # 10 pages of 4
    hashes = page_hashes(prompt, 4)
    holder, idle = backend("holder", open_by_class=[0, 2, 0]), backend("idle")
    pool = pool_of(holder, idle)
    pool.index.apply(events("holder", 1, stored=hashes))
    assert pool.choose(prompt=prompt).worker_id == "holder"  # 2 - 10 < 0
    holder.open_by_class = [0, 12, 0]
    assert pool.choose(prompt=prompt).worker_id == "idle"
    holder.open_by_class = [0, 0, 0]
    assert {pool.choose().worker_id for _ in range(2)} == {"holder", "idle"}  # load alone


async def test_a_request_hashes_its_prompt_once_per_page_size(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import splitserve.router.pool as pool_module

    calls: list[int] = []

    def counted(tokens, page_size):  # type: ignore[no-untyped-def]
        calls.append(page_size)
        return page_hashes(tokens, page_size)

    monkeypatch.setattr(pool_module, "page_hashes", counted)
    prompt = list(range(40))
    holder, idle = backend("holder"), backend("idle")
    pool = pool_of(holder, idle)
    pool.index.apply(events("holder", 1, stored=page_hashes(prompt, 4)))
    pages = pool_module.PromptPages(prompt)
    chosen = pool.choose(prompt=pages)
    assert chosen is not None and chosen.worker_id == "holder"
    assert pool.uncached_tokens(chosen, pages) == 1  # every page held: at least one token
    assert pool.uncached_tokens(idle, pages) == 40
    assert calls == [4]  # both backends have 4-token pages: hashed once
