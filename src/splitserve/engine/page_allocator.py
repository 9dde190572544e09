"""Page allocator with a prefix cache and a quarantine.

Page states:
- *in use*: reference count > 0 (one per sequence holding it).
- *free*: count 0, kept in an LRU queue. A free page may still be *cached*: it
  holds a full page of tokens whose chained hash is in the prefix cache, so a
  later request with the same prefix can reuse it. Allocation takes the least
  recently freed page and evicts its cache entry.
- *quarantined*: count 0 but not allocatable before a release time. Landing pages
  of a remote-prefill attempt wait here until the attempt's lease has expired, so a
  late one-sided write can never land in another request's KV (the fence
  invariant). Quarantined pages are never in the prefix cache; a quarantine may
  carry a `Publication`: when it ends (no write can land any more) and its check
  passes, its full pages enter the cache as they return to the free queue.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

NO_HASH = b""


@dataclass(frozen=True)
class Publication:
    """Pages to publish to the prefix cache when their quarantine ends: `hashes` by
    page id (full pages only), after `check(page_ids)` (e.g. checksums of the landed
    data) still holds for the group `page_ids`."""

    page_ids: tuple[int, ...]
    hashes: dict[int, bytes]
    check: Callable[[list[int]], bool] | None = None


def page_hashes(token_ids: Sequence[int], page_size: int) -> list[bytes]:
    """Chained hash of every full page: hash_i covers tokens [0, (i+1)·page_size)."""
    hashes: list[bytes] = []
    parent = NO_HASH
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(b"".join(t.to_bytes(4, "little") for t in token_ids[start : start + page_size]))
        parent = h.digest()
        hashes.append(parent)
    return hashes


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_pages))
        self._hash_of_page: list[bytes] = [NO_HASH] * num_pages
        self._page_of_hash: dict[bytes, int] = {}
        self._quarantine: list[tuple[float, int]] = []  # heap of (release_at, page_id)
        self._publications: dict[int, Publication] = {}  # quarantined page id → its group
        self.num_published = 0  # quarantined pages that entered the cache on release
        self.num_cache_hits = 0  # tokens served from the prefix cache
        self.num_evictions = 0
        # With `record_events`: every change of the prefix cache, in order, until taken
        # ((True, hash): cached; (False, hash): no longer), for the routers' prefix index.
        self.record_events = False
        self._events: list[tuple[bool, bytes]] = []

    # --- counts -----------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_quarantined_pages(self) -> int:
        return len(self._quarantine)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages - self.num_quarantined_pages

    @property
    def num_cached_pages(self) -> int:
        return len(self._page_of_hash)

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    # --- allocation ---------------------------------------------------------------
    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` pages, least recently freed first, evicting their cache entries."""
        if num_pages > len(self._free):
            raise MemoryError(f"asked for {num_pages} pages, {len(self._free)} free")
        page_ids = []
        for _ in range(num_pages):
            page_id, _ = self._free.popitem(last=False)
            self._uncache(page_id, evicted=True)
            self._ref_counts[page_id] = 1
            page_ids.append(page_id)
        return page_ids

    def free(self, page_ids: Sequence[int]) -> None:
        """Drop one reference from each page. Pages are freed tail first, so a
        sequence's later pages are evicted before its prefix."""
        for page_id in reversed(page_ids):
            self._ref_counts[page_id] -= 1
            assert self._ref_counts[page_id] >= 0, f"page {page_id} freed twice"
            if self._ref_counts[page_id] == 0:
                self._free[page_id] = None

    def quarantine(self, page_ids: Sequence[int], release_at: float,
                   publish: Publication | None = None) -> None:
        """Drop one reference; pages reaching zero wait until `release_at` (monotonic s),
        then go to the free queue, those of `publish` into the prefix cache too."""
        for page_id in page_ids:
            self._ref_counts[page_id] -= 1
            assert self._ref_counts[page_id] >= 0, f"page {page_id} freed twice"
            if self._ref_counts[page_id] == 0:
                self._uncache(page_id, evicted=False)
                heapq.heappush(self._quarantine, (release_at, page_id))
                if publish is not None:
                    self._publications[page_id] = publish

    def release_quarantined(self, now: float) -> list[int]:
        """Return pages whose quarantine ended by `now` to the free queue, and publish
        those whose group was released whole and passes its check."""
        released: list[int] = []
        while self._quarantine and self._quarantine[0][0] <= now:
            _, page_id = heapq.heappop(self._quarantine)
            self._free[page_id] = None
            released.append(page_id)
        groups: dict[int, Publication] = {}
        for page_id in released:
            group = self._publications.pop(page_id, None)
            if group is not None:
                groups[id(group)] = group
        for group in groups.values():
            if any(page_id in self._publications for page_id in group.page_ids):
                continue  # part of it is still fenced (a group shares one release time)
            if group.check is None or group.check(list(group.page_ids)):
                pages = [p for p in group.page_ids if p in group.hashes and p in self._free]
                before = self.num_cached_pages
                self.cache_pages(pages, [group.hashes[p] for p in pages])
                self.num_published += self.num_cached_pages - before
        return released

    def next_quarantine_release(self) -> float | None:
        return self._quarantine[0][0] if self._quarantine else None

    # --- prefix cache -------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages caching the longest run of `hashes`; each gets a reference."""
        if not self.enable_prefix_cache:
            return []
        page_ids = []
        for h in hashes:
            page_id = self._page_of_hash.get(h)
            if page_id is None:
                break
            page_ids.append(page_id)
        for page_id in page_ids:
            if self._ref_counts[page_id] == 0:
                del self._free[page_id]
            self._ref_counts[page_id] += 1
        self.num_cache_hits += len(page_ids) * self.page_size
        return page_ids

    def count_cached_prefix(self, hashes: Sequence[bytes]) -> int:
        """How many leading pages of `hashes` the cache holds (takes no references)."""
        if not self.enable_prefix_cache:
            return 0
        count = 0
        for h in hashes:
            if h not in self._page_of_hash:
                break
            count += 1
        return count

    def cache_pages(self, page_ids: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Publish full, computed pages under their hashes (first writer wins)."""
        if not self.enable_prefix_cache:
            return
        for page_id, h in zip(page_ids, hashes):
            if self._hash_of_page[page_id] != NO_HASH or h in self._page_of_hash:
                continue
            self._hash_of_page[page_id] = h
            self._page_of_hash[h] = page_id
            if self.record_events:
                self._events.append((True, h))

    def _uncache(self, page_id: int, evicted: bool) -> None:
        h = self._hash_of_page[page_id]
        if h != NO_HASH:
            del self._page_of_hash[h]
            self._hash_of_page[page_id] = NO_HASH
            self.num_evictions += evicted
            if self.record_events:
                self._events.append((False, h))

    def take_events(self) -> tuple[tuple[bool, bytes], ...]:
        """The prefix-cache changes since the last call (see `record_events`)."""
        events, self._events = tuple(self._events), []
        return events
