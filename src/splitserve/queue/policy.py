"""`PolicyStore`: live routing thresholds and QoS knobs in `splitserve-policy`.

Written by the planner or an admin, watched by decode workers. Values are opaque
bytes here (the typed policy message comes with the planner). Every write returns
the new revision; `put(..., expected_revision=r)` is a compare-and-set so two
writers never silently overwrite each other. The bucket keeps the last
`policy_history` revisions of each key for inspection and rollback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import InvalidKVValue, PolicyBucketMissing, PolicyConflict
from splitserve.queue.kv_watch import (
    KVEvent,
    read_bucket,
    read_history,
    restarting_watch,
    watch_bucket,
)
from splitserve.queue.settings import BucketSettings
from splitserve.queue.streams import ensure_policy_bucket
from splitserve.queue.subjects import BUCKET_POLICY

log = logging.getLogger(__name__)

# The server's "wrong last sequence" error codes (a compare-and-set lost).
_WRONG_LAST_SEQUENCE = (10071, 10164)

# KV keys are subject tokens joined by '.': "routing.thresholds", "qos.interactive".
_KEY_RE = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")


def validate_policy_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise InvalidKVValue(BUCKET_POLICY, key, "keys are '.'-separated tokens of letters, "
                             "digits, '-', '_', '=' and '/'")
    return key


PolicyEntry = KVEvent  # key, value (None: deleted), revision


class PolicyStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, settings: BucketSettings) -> PolicyStore:
        return cls(await ensure_policy_bucket(js, settings))

    @classmethod
    async def bind(cls, js: JetStreamContext) -> PolicyStore:
        """The bucket as the workers created it (an admin tool must not impose its own
        bucket settings); PolicyBucketMissing when no worker has created it yet."""
        try:
            return cls(await js.key_value(BUCKET_POLICY))
        except BucketNotFoundError:
            raise PolicyBucketMissing(BUCKET_POLICY) from None

    async def get(self, key: str) -> PolicyEntry | None:
        """The current value and revision of `key`, or None if never set or deleted."""
        try:
            entry = await self._kv.get(validate_policy_key(key))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return KVEvent(key=key, value=entry.value, revision=int(entry.revision or 0),
                       initial=True)

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write `value`; returns the new revision. With `expected_revision` the write
        happens only if the key is still at that revision (0: must not exist yet),
        else PolicyConflict."""
        validate_policy_key(key)
        try:
            if expected_revision is None:
                revision = await self._kv.put(key, value)
            elif expected_revision == 0:
                revision = await self._kv.create(key, value)
            else:
                revision = await self._kv.update(key, value, last=expected_revision)
        except KeyWrongLastSequenceError as err:
            current = await self.get(key)
            raise PolicyConflict(key, expected_revision or 0,
                                 current.revision if current else 0) from err
        log.debug("policy %s set (revision %d, %d bytes)", key, revision, len(value))
        return int(revision)

    async def delete(self, key: str, *, expected_revision: int | None = None) -> None:
        """Delete `key` (watchers see value None). With `expected_revision` only if the
        key is still at that revision, else PolicyConflict."""
        validate_policy_key(key)
        try:
            await self._kv.delete(key, last=expected_revision)
        except APIError as err:
            if err.err_code not in _WRONG_LAST_SEQUENCE:
                raise
            current = await self.get(key)
            raise PolicyConflict(key, expected_revision or 0,
                                 current.revision if current else 0) from err
        log.debug("policy %s deleted", key)

    async def items(self) -> dict[str, PolicyEntry]:
        """All current keys with their values and revisions."""
        return await read_bucket(self._kv)

    async def history(self, key: str) -> list[PolicyEntry]:
        """Past revisions of `key`, oldest first (at most `policy_history`)."""
        return await read_history(self._kv, validate_policy_key(key))

    async def watch(self, keys: str = ">", *, deleted_in_snapshot: bool = False
                    ) -> AsyncIterator[PolicyEntry]:
        """Current values of `keys` (a key or wildcard), then every change; a deletion
        arrives with value None (with `deleted_in_snapshot`, a key deleted before the
        watch started too)."""
        async for event in watch_bucket(self._kv, keys, deleted_in_snapshot=deleted_in_snapshot):
            yield event

    def watch_forever(self, broker: BrokerConnection, keys: str = ">", retry_s: float = 1.0
                      ) -> AsyncIterator[PolicyEntry | None]:
        """`watch(keys)` that never ends, restarted at once when the client reconnects
        (`kv_watch.restarting_watch`). None marks a restart: a fresh snapshot follows,
        deleted keys included (value None), so a delete meanwhile is not missed."""
        return restarting_watch(broker, lambda: self.watch(keys, deleted_in_snapshot=True),
                                "policy", retry_s)
