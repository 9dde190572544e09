"""Watch a KV bucket as a stream of (key, value or None) events.

The bucket's current contents come first (live keys only: tombstones of keys
deleted or expired before the watch started are skipped), then every change.
Deletes, purges and the server's expiry markers (TTL) all arrive as value None.
Across a broker restart the client's ordered consumer notices the missing
heartbeats (~10 s) and resumes after the last event it delivered; `restarting_watch`
instead starts a fresh watch as soon as the client reconnects.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from splitserve.queue.connection import BrokerConnection
from splitserve.tasks import stop_tasks

log = logging.getLogger(__name__)

E = TypeVar("E")


@dataclass(frozen=True)
class KVEvent:
    key: str
    value: bytes | None  # None: deleted, purged or expired
    revision: int
    initial: bool  # part of the contents present when the watch started


def is_tombstone(entry: KeyValue.Entry) -> bool:
    return entry.operation in (KV_DEL, KV_PURGE)


async def watch_bucket(kv: KeyValue, keys: str = ">", *, deleted_in_snapshot: bool = False
                       ) -> AsyncIterator[KVEvent]:
    """Async iterator over KVEvents for `keys` (a KV key or wildcard pattern). With
    `deleted_in_snapshot` the snapshot also reports keys whose last entry is a delete
    (value None), for a watcher that must notice a delete it did not see happen."""
    watcher = await kv.watch(keys)
    initial = True
    try:
        async for entry in watcher:
            if entry is None:  # the client's "caught up with existing contents" marker
                initial = False
                continue
            tombstone = is_tombstone(entry)
            if initial and tombstone and not deleted_in_snapshot:
                continue
            yield KVEvent(key=entry.key, value=None if tombstone else entry.value,
                          revision=int(entry.revision or 0), initial=initial)
    finally:
        await watcher.stop()


async def _one_pass(watcher: KeyValue.KeyWatcher, timeout_s: float,
                    marker_ends: Callable[[], bool]) -> AsyncIterator[KeyValue.Entry]:
    """The entries a fresh watcher delivers in its first pass, up to the one with nothing
    pending after it (`delta` 0). The client's "caught up" marker (None) can come before
    the entries: it decides from the consumer's pending count, which is 0 once
    everything is on its way to us, even when nothing has been processed yet (seen here
    under load: `list()` answered {} for a bucket of 2 keys, `history` [] for a key of
    5 revisions). So a marker ends the pass only when `marker_ends()` says so, or when
    nothing more arrives within a second of it (nothing matches)."""
    marker_seen = False
    while True:
        try:
            entry = await watcher.updates(timeout=1.0 if marker_seen else timeout_s)
        except nats.errors.TimeoutError:
            if marker_seen:
                return
            raise
        if entry is None:
            if marker_ends():
                return
            marker_seen = True  # maybe early: the entries may still be on their way
            continue
        yield entry
        if not entry.delta:
            return


async def read_bucket(kv: KeyValue, keys: str = ">", timeout_s: float = 10.0
                      ) -> dict[str, KVEvent]:
    """The live entries matching `keys` now (one pass, no waiting for changes); a marker
    ends the pass at once when the stream is empty or entries came before it."""
    expect_entries = (await kv.status()).stream_info.state.messages > 0
    watcher = await kv.watch(keys)
    entries: dict[str, KVEvent] = {}
    try:
        async for entry in _one_pass(watcher, timeout_s,
                                     lambda: not expect_entries or bool(entries)):
            if is_tombstone(entry):
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = KVEvent(key=entry.key, value=entry.value,
                                             revision=int(entry.revision or 0), initial=True)
    finally:
        await watcher.stop()
    return entries


async def read_history(kv: KeyValue, key: str, timeout_s: float = 10.0) -> list[KVEvent]:
    """Every kept revision of `key`, oldest first (deletes as value None; [] : none).
    Not the client's own `history`, which ends at the marker (see `_one_pass`)."""
    watcher = await kv.watch(key, include_history=True)
    try:
        return [KVEvent(key=key, value=None if is_tombstone(e) else e.value,
                        revision=int(e.revision or 0), initial=True)
                async for e in _one_pass(watcher, timeout_s, lambda: False)]
    finally:
        await watcher.stop()


async def restarting_watch(broker: BrokerConnection, open_watch: Callable[[], AsyncIterator[E]],
                           what: str, retry_s: float = 1.0) -> AsyncIterator[E | None]:
    """The events of `open_watch()`, never ending: a fresh watch after an error and as
    soon as the client reconnects to the broker (left to itself, the client's watch
    resumes ~19 s after a broker restart, measured here). None marks a restart: the
    events that follow start again with a snapshot of the live keys."""
    while True:
        reconnects = broker.num_reconnects
        events: asyncio.Queue[E] = asyncio.Queue()
        task = asyncio.create_task(_pump(open_watch(), events))
        try:
            while broker.num_reconnects == reconnects and not task.done():
                try:
                    async with asyncio.timeout(0.5):  # not wait_for: see tasks.py
                        event = await events.get()
                except TimeoutError:
                    continue
                yield event
            while not events.empty():
                yield events.get_nowait()
            ended = task.done()
            if ended and not task.cancelled() and task.exception() is not None:
                log.warning("%s watch failed (%r); retrying in %.0f s", what, task.exception(),
                            retry_s)
        finally:
            await stop_tasks(task)  # its failure was logged above
        if ended:
            await asyncio.sleep(retry_s)
        else:
            log.info("reconnected to the broker: restarting the %s watch", what)
        yield None


async def _pump(watch: AsyncIterator[E], events: asyncio.Queue[E]) -> None:
    async for event in watch:
        await events.put(event)
