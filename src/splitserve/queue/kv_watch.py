"""Watch a KV bucket as a stream of (key, value or None) events.

The bucket's current contents come first (live keys only: tombstones of keys
deleted or expired before the watch started are skipped), then every change.
Deletes, purges and the server's expiry markers (TTL) all arrive as value None.
Across a broker restart the client's ordered consumer notices the missing
heartbeats (~10 s) and resumes after the last event it delivered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue


@dataclass(frozen=True)
class KVEvent:
    key: str
    value: bytes | None  # None: deleted, purged or expired
    revision: int
    initial: bool  # part of the contents present when the watch started


def is_tombstone(entry: KeyValue.Entry) -> bool:
    return entry.operation in (KV_DEL, KV_PURGE)


async def watch_bucket(kv: KeyValue, keys: str = ">") -> AsyncIterator[KVEvent]:
    """Async iterator over KVEvents for `keys` (a KV key or wildcard pattern)."""
    watcher = await kv.watch(keys)
    initial = True
    try:
        async for entry in watcher:
            if entry is None:  # the client's "caught up with existing contents" marker
                initial = False
                continue
            tombstone = is_tombstone(entry)
            if initial and tombstone:
                continue
            yield KVEvent(key=entry.key, value=None if tombstone else entry.value,
                          revision=int(entry.revision or 0), initial=initial)
    finally:
        await watcher.stop()


async def read_bucket(kv: KeyValue, keys: str = ">") -> dict[str, KVEvent]:
    """The live entries matching `keys` now (one pass, no waiting for changes)."""
    watcher = await kv.watch(keys)
    entries: dict[str, KVEvent] = {}
    try:
        async for entry in watcher:
            if entry is None:  # caught up
                break
            if is_tombstone(entry):
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = KVEvent(key=entry.key, value=entry.value,
                                             revision=int(entry.revision or 0), initial=True)
    finally:
        await watcher.stop()
    return entries
