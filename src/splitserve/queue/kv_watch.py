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


async def read_bucket(kv: KeyValue, keys: str = ">", timeout_s: float = 10.0
                      ) -> dict[str, KVEvent]:
    """The live entries matching `keys` now (one pass, no waiting for changes).

    The client's "caught up" marker (None) can come before the entries: it decides from
    the consumer's pending count, which is 0 once everything is on its way to us, even
    when nothing has been processed yet (seen here under load: `list()` answered {}
    for a bucket of 2 keys). So the pass ends at the entry with nothing pending after
    it (`delta` 0); a marker ends it only when the stream is empty, or nothing more
    arrives within a second of it (a `keys` pattern that matches nothing).
    """
    expect_entries = (await kv.status()).stream_info.state.messages > 0
    watcher = await kv.watch(keys)
    entries: dict[str, KVEvent] = {}
    marker_seen = False
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=1.0 if marker_seen else timeout_s)
            except nats.errors.TimeoutError:
                if marker_seen:
                    break
                raise
            if entry is None:
                if not expect_entries or entries:
                    break
                marker_seen = True  # maybe early: the entries may still be on their way
                continue
            if is_tombstone(entry):
                entries.pop(entry.key, None)
            else:
                entries[entry.key] = KVEvent(key=entry.key, value=entry.value,
                                             revision=int(entry.revision or 0), initial=True)
            if not entry.delta:
                break
    finally:
        await watcher.stop()
    return entries


async def read_history(kv: KeyValue, key: str, timeout_s: float = 10.0) -> list[KVEvent]:
    """Every kept revision of `key`, oldest first (deletes as value None; [] : none).
    The client's own `history` ends at its "caught up" marker, which can come before
    the entries (see `read_bucket`; seen in CI under load: [] for a key with 5
    revisions), so this pass ends at the entry with nothing pending after it; a marker
    ends it only when nothing arrives within a second of it (a key without entries)."""
    watcher = await kv.watch(key, include_history=True)
    history: list[KVEvent] = []
    marker_seen = False
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=1.0 if marker_seen else timeout_s)
            except nats.errors.TimeoutError:
                if marker_seen:
                    return history
                raise
            if entry is None:
                marker_seen = True  # maybe early: the entries may still be on their way
                continue
            history.append(KVEvent(key=key, value=None if is_tombstone(entry) else entry.value,
                                   revision=int(entry.revision or 0), initial=True))
            if not entry.delta:
                return history
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
