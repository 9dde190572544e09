"""`WorkerRegistry`: which workers are alive and how to reach them.

Each worker puts its descriptor (serialized `WorkerDescriptor`, opaque bytes here)
under its worker id in `splitserve-workers` and re-puts it every TTL/3. The bucket
TTL removes a worker whose heartbeats stopped (crash, partition) and the server
writes an expiry marker, so watchers see it go; a clean shutdown deletes at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import TRANSIENT_BROKER_ERRORS, InvalidKVValue
from splitserve.queue.kv_watch import read_bucket, restarting_watch, watch_bucket
from splitserve.queue.settings import BucketSettings
from splitserve.queue.streams import ensure_workers_bucket
from splitserve.queue.subjects import BUCKET_WORKERS, validate_worker_id
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.tasks import stop_tasks

log = logging.getLogger(__name__)


class WorkerRegistry:
    """Worker id -> descriptor bytes, kept alive by a heartbeat task per registered id."""

    def __init__(self, kv: KeyValue, settings: BucketSettings) -> None:
        self._kv = kv
        self.settings = settings
        self.heartbeat_interval_s = settings.worker_ttl_s / 3
        self._descriptors: dict[str, bytes] = {}
        self._heartbeats: dict[str, asyncio.Task[None]] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, settings: BucketSettings) -> WorkerRegistry:
        return cls(await ensure_workers_bucket(js, settings), settings)

    async def register(self, worker_id: str, descriptor: bytes) -> int:
        """Publish (or replace) this worker's descriptor and keep it alive; returns
        the revision. Raises on broker trouble: a worker must not serve unregistered."""
        validate_worker_id(worker_id)
        if not descriptor:
            raise InvalidKVValue(BUCKET_WORKERS, worker_id, "empty descriptor")
        revision = await self._kv.put(worker_id, bytes(descriptor))
        self._descriptors[worker_id] = bytes(descriptor)
        if worker_id not in self._heartbeats:
            self._heartbeats[worker_id] = asyncio.create_task(
                self._heartbeat(worker_id), name=f"registry-heartbeat-{worker_id}")
        log.info("worker %s registered (revision %d, %d bytes)", worker_id, revision,
                    len(descriptor))
        return revision

    async def stop_heartbeat(self, worker_id: str) -> None:
        """Stop refreshing `worker_id`; its entry expires after the bucket TTL."""
        task = self._heartbeats.pop(worker_id, None)
        self._descriptors.pop(worker_id, None)
        await stop_tasks(task)

    async def deregister(self, worker_id: str) -> None:
        """Clean shutdown: stop the heartbeat and delete the entry now."""
        await self.stop_heartbeat(worker_id)
        await self._kv.delete(validate_worker_id(worker_id))
        log.info("worker %s deregistered", worker_id)

    async def close(self) -> None:
        """Stop all heartbeats without deleting (entries then expire by TTL)."""
        for worker_id in list(self._heartbeats):
            await self.stop_heartbeat(worker_id)

    async def get(self, worker_id: str) -> bytes | None:
        """The live descriptor of `worker_id`, or None if absent, deleted or expired."""
        try:
            entry = await self._kv.get(validate_worker_id(worker_id))
        except KeyNotFoundError:
            return None
        # An expiry marker reads back as an entry with no value (descriptors are
        # never empty, see register()).
        return entry.value or None

    async def list(self) -> dict[str, bytes]:
        """All live workers, from one pass over the bucket."""
        entries = await read_bucket(self._kv)
        return {key: event.value for key, event in entries.items() if event.value}

    async def live_ids(self, retry_s: float = 1.0) -> set[str]:
        """The ids of the live workers, asked until the broker answers. After a watch
        restart (None from `watch_forever`), whoever a watcher knew and is not among
        them left while nobody watched; a watcher keeps its view until then (cleared,
        it would see no worker for as long as a stream leader election lasts)."""
        while True:
            try:
                return set(await self.list())
            except TRANSIENT_BROKER_ERRORS as exc:
                log.info("registry list failed (%r); retrying in %.1f s", exc, retry_s)
                await asyncio.sleep(retry_s)

    async def watch(self) -> AsyncIterator[tuple[str, bytes | None]]:
        """Live workers first, then every change: (worker_id, descriptor) when one
        registers or changes its descriptor, (worker_id, None) when it deregisters
        or expires. Heartbeats that re-put the same bytes are not reported."""
        seen: dict[str, bytes] = {}
        async for event in watch_bucket(self._kv):
            if event.value is None:
                if seen.pop(event.key, None) is not None:
                    yield event.key, None
            elif seen.get(event.key) != event.value:
                seen[event.key] = event.value
                yield event.key, event.value

    def watch_forever(self, broker: BrokerConnection, retry_s: float = 1.0
                      ) -> AsyncIterator[tuple[str, bytes | None] | None]:
        """`watch()` that never ends (`kv_watch.restarting_watch`): restarted after an
        error and as soon as the client reconnects. None marks a restart: the events
        that follow start again with a snapshot of the live workers (it reports no
        worker that left meanwhile: see `live_ids`)."""
        return restarting_watch(broker, self.watch, "registry", retry_s)

    async def _heartbeat(self, worker_id: str) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.heartbeat_interval_s if not failing else
                                min(1.0, self.heartbeat_interval_s))
            try:
                await self._kv.put(worker_id, self._descriptors[worker_id])
            except TRANSIENT_BROKER_ERRORS as err:
                if not failing:
                    log.warning("worker %s: registry heartbeat failed (%s: %s); retrying",
                                   worker_id, type(err).__name__, err)
                failing = True
                continue
            if failing:
                log.info("worker %s: registry heartbeat restored", worker_id)
            failing = False


def parse_descriptor(worker_id: str, data: bytes) -> WorkerDescriptor | None:
    """A registry entry, or None (logged) when it is not a WorkerDescriptor: one garbage
    value must not take down a watch or a job."""
    try:
        descriptor = WorkerDescriptor.FromString(data)
    except DecodeError as exc:
        log.warning("registry entry %s is not a WorkerDescriptor (%s); skipped", worker_id, exc)
        return None
    if descriptor.worker_id != worker_id or not descriptor.role:
        log.warning("registry entry %s names worker %r, role %r; skipped", worker_id,
                    descriptor.worker_id, descriptor.role)
        return None
    return descriptor
