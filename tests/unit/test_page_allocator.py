"""Page allocator and prefix cache on an 11-page pool: exact page ids and eviction order."""

from __future__ import annotations

import pytest

from splitserve.engine.page_allocator import PageAllocator, page_hashes

PAGE = 4


def tokens(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


def test_allocate_takes_lowest_ids_first_and_free_order_is_lru() -> None:
    a = PageAllocator(11, PAGE)
    assert a.allocate(3) == [0, 1, 2]
    assert a.allocate(2) == [3, 4]
    assert a.num_free_pages == 6 and a.num_used_pages == 5
    a.free([0, 1, 2])  # freed tail first: 2, 1, 0 join the back of the queue
    assert a.allocate(6) == [5, 6, 7, 8, 9, 10]
    assert a.allocate(3) == [2, 1, 0]
    assert not a.can_allocate(1)
    with pytest.raises(MemoryError):
        a.allocate(1)


def test_prefix_cache_hit_shares_pages_and_counts_references() -> None:
    a = PageAllocator(11, PAGE)
    prompt = tokens(10)  # two full pages + 2 tokens
    hashes = page_hashes(prompt, PAGE)
    assert len(hashes) == 2
    pages = a.allocate(3)
    a.cache_pages(pages[:2], hashes)
    assert a.num_cached_pages == 2
    hit = a.match_prefix(hashes)
    assert hit == [0, 1]
    assert [a.ref_count(p) for p in (0, 1, 2)] == [2, 2, 1]
    a.free(pages)
    assert [a.ref_count(p) for p in (0, 1, 2)] == [1, 1, 0]
    # a different second page stops the match after the first
    other = page_hashes(tokens(4) + tokens(4, base=100), PAGE)
    assert other[0] == hashes[0] and other[1] != hashes[1]
    assert a.match_prefix(other) == [0]


def test_hashes_chain_over_the_prefix() -> None:
    same_page_other_prefix = page_hashes(tokens(4, base=50) + tokens(4), PAGE)
    assert page_hashes(tokens(8), PAGE)[1] != same_page_other_prefix[1]
    assert page_hashes(tokens(7), PAGE) == page_hashes(tokens(4), PAGE)


def test_eviction_takes_least_recently_freed_cached_page() -> None:
    a = PageAllocator(11, PAGE)
    seq_a = a.allocate(2)  # [0, 1]
    seq_b = a.allocate(2)  # [2, 3]
    ha = page_hashes(tokens(8), PAGE)
    hb = page_hashes(tokens(8, base=200), PAGE)
    a.cache_pages(seq_a, ha)
    a.cache_pages(seq_b, hb)
    a.free(seq_a)  # queue: 4..10, 1, 0
    a.free(seq_b)  # queue: 4..10, 1, 0, 3, 2
    assert a.num_free_pages == 11 and a.num_cached_pages == 4
    assert a.allocate(7) == [4, 5, 6, 7, 8, 9, 10]
    assert a.num_evictions == 0
    assert a.allocate(1) == [1]  # seq_a's tail page goes first
    assert a.num_evictions == 1 and a.num_cached_pages == 3
    assert a.match_prefix(ha) == [0]  # its head page is still cached
    assert a.match_prefix(hb) == [2, 3]


def test_cache_hit_revives_a_free_page_out_of_the_lru_queue() -> None:
    a = PageAllocator(11, PAGE)
    pages = a.allocate(1)
    h = page_hashes(tokens(4), PAGE)
    a.cache_pages(pages, h)
    a.free(pages)
    assert a.match_prefix(h) == [0]
    assert a.num_free_pages == 10
    assert a.allocate(10) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]


def test_quarantine_holds_pages_until_release_time_and_uncaches_them() -> None:
    a = PageAllocator(11, PAGE)
    landing = a.allocate(3)
    a.cache_pages(landing[:1], page_hashes(tokens(4), PAGE))
    a.quarantine(landing, release_at=100.0)
    assert a.num_quarantined_pages == 3 and a.num_free_pages == 8
    assert a.num_cached_pages == 0  # a zombie write may land here: never serve it
    assert a.next_quarantine_release() == 100.0
    assert a.allocate(8) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert not a.can_allocate(1)
    assert a.release_quarantined(now=99.9) == []
    assert sorted(a.release_quarantined(now=100.0)) == [0, 1, 2]
    assert a.num_quarantined_pages == 0 and a.can_allocate(3)


def test_quarantine_of_shared_page_waits_for_last_reference() -> None:
    a = PageAllocator(11, PAGE)
    pages = a.allocate(1)
    h = page_hashes(tokens(4), PAGE)
    a.cache_pages(pages, h)
    a.match_prefix(h)  # second holder
    a.quarantine(pages, release_at=5.0)
    assert a.num_quarantined_pages == 0 and a.ref_count(0) == 1
    a.free(pages)
    assert a.num_free_pages == 11


def test_disabled_prefix_cache_never_matches() -> None:
    a = PageAllocator(11, PAGE, enable_prefix_cache=False)
    pages = a.allocate(2)
    h = page_hashes(tokens(8), PAGE)
    a.cache_pages(pages, h)
    assert a.match_prefix(h) == []
