"""Which decode worker holds which prompt prefix, in bounded memory.

`PrefixIndex` follows the workers' `KVCacheEvents` (page hashes cached or evicted):
hash → the workers that hold that page. `RecentRoutes` remembers where this router
sent each page hash lately, which covers the time before a worker's events arrive
(and workers whose events are lost). Both hold at most `max_entries` hashes and forget
the least recently touched first; a prompt's match on a worker is the number of its
leading pages found there (a page is usable only after every page before it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from splitserve.queue.messages import KVCacheEvents


class PrefixIndex:
    def __init__(self, max_entries: int = 1 << 20) -> None:
        self.max_entries = max_entries
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()
        self._last_seq: dict[str, tuple[str, int]] = {}  # worker → (incarnation, seq)
        self.num_gaps = 0  # messages missed (seen by their sequence numbers)
        self.num_evicted = 0  # hashes forgotten to stay within max_entries

    def __len__(self) -> int:
        return len(self._holders)

    def apply(self, events: KVCacheEvents) -> None:
        worker = events.worker_id
        last = self._last_seq.get(worker)
        if events.reset or last is None or last[0] != events.incarnation:
            self.forget(worker)  # a new life, or the sender dropped changes
        elif events.seq != last[1] + 1:
            self.num_gaps += events.seq - last[1] - 1
        self._last_seq[worker] = (events.incarnation, events.seq)
        for page_hash in events.removed:
            holders = self._holders.get(page_hash)
            if holders is not None:
                holders.discard(worker)
                if not holders:
                    del self._holders[page_hash]
        for page_hash in events.stored:
            self._holders.setdefault(page_hash, set()).add(worker)
            self._holders.move_to_end(page_hash)
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)
            self.num_evicted += 1

    def forget(self, worker_id: str) -> None:
        """Drop everything known of the worker (it left, restarted, or lost events)."""
        self._last_seq.pop(worker_id, None)
        for page_hash in [h for h, holders in self._holders.items() if worker_id in holders]:
            holders = self._holders[page_hash]
            holders.discard(worker_id)
            if not holders:
                del self._holders[page_hash]

    def matched_pages(self, hashes: Sequence[bytes], workers: Iterable[str]) -> dict[str, int]:
        """For each worker, how many leading pages of `hashes` it holds."""
        matched = dict.fromkeys(workers, 0)
        alive = set(matched)
        for depth, page_hash in enumerate(hashes):
            holders = self._holders.get(page_hash)
            if not holders:
                break
            alive &= holders
            if not alive:
                break
            for worker in alive:
                matched[worker] = depth + 1
            self._holders.move_to_end(page_hash)
        return matched


class RecentRoutes:
    """page hash → the worker this router last sent a prompt with that page to."""

    def __init__(self, max_entries: int = 1 << 18) -> None:
        self.max_entries = max_entries
        self._worker: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._worker)

    def record(self, hashes: Sequence[bytes], worker_id: str) -> None:
        for page_hash in hashes:
            self._worker[page_hash] = worker_id
            self._worker.move_to_end(page_hash)
        while len(self._worker) > self.max_entries:
            self._worker.popitem(last=False)

    def matched_pages(self, hashes: Sequence[bytes], worker_id: str) -> int:
        count = 0
        for page_hash in hashes:
            if self._worker.get(page_hash) != worker_id:
                break
            count += 1
        return count
