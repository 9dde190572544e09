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
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from splitserve.queue.errors import InvalidKVValue, PolicyConflict
from splitserve.queue.kv_watch import KVEvent, is_tombstone, read_bucket, watch_bucket
from splitserve.queue.settings import BucketSettings
from splitserve.queue.streams import ensure_policy_bucket
from splitserve.queue.subjects import BUCKET_POLICY

logger = logging.getLogger(__name__)

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
        logger.info("policy %s set (revision %d, %d bytes)", key, revision, len(value))
        return int(revision)

    async def delete(self, key: str) -> None:
        await self._kv.delete(validate_policy_key(key))
        logger.info("policy %s deleted", key)

    async def items(self) -> dict[str, PolicyEntry]:
        """All current keys with their values and revisions."""
        return await read_bucket(self._kv)

    async def history(self, key: str) -> list[PolicyEntry]:
        """Past revisions of `key`, oldest first (at most `policy_history`)."""
        try:
            entries = await self._kv.history(validate_policy_key(key))
        except NoKeysError:
            return []
        return [KVEvent(key=key, value=None if is_tombstone(e) else e.value,
                        revision=int(e.revision or 0), initial=True) for e in entries]

    async def watch(self, keys: str = ">") -> AsyncIterator[PolicyEntry]:
        """Current values of `keys` (a key or wildcard), then every change; a deletion
        arrives with value None."""
        async for event in watch_bucket(self._kv, keys):
            yield event
