"""`splitserve admin policy get|set|delete`: the splitserve-policy bucket as an operator
reads and writes it (straight to the broker; decode workers watch the bucket).

Every write is a compare-and-set on the key's revision: `expected_revision` when the
operator names one (0: the key must not exist), else the revision read just before,
so a write that raced with another (the planner, a second operator) fails with
`PolicyConflict` instead of silently replacing it. A value is validated as the
workers will validate it (`routing.policy.effective_routing`) before it is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.js.errors import APIError

from splitserve.config.daemon import WorkerConfig
from splitserve.config.router import RouterPolicy
from splitserve.config.security import NatsAuthConfig
from splitserve.errors import ConfigError
from splitserve.queue.connection import connect
from splitserve.queue.errors import BrokerError, PolicyConflict
from splitserve.queue.policy import PolicyStore
from splitserve.redact import redact_url
from splitserve.routing.offload import RoutingConfig
from splitserve.routing.policy import (
    ROUTER_POLICY_KEY,
    ROUTING_POLICY_KEY,
    effective_router_policy,
    effective_routing,
    encode_override,
    parse_override,
)

log = logging.getLogger(__name__)

DEFAULT_NATS_URL = WorkerConfig.nats_url  # the broker the workers use by default


@dataclass(frozen=True)
class BrokerTarget:
    """The broker and how to log in (`splitserve up` makes an `admin` user; see README)."""

    url: str = DEFAULT_NATS_URL
    auth: NatsAuthConfig = field(default_factory=NatsAuthConfig)

# The keys an operator may write, each with the check the workers apply to its value
# (per-field checks: the defaults stand in for any config file's fields).
POLICY_KEYS: dict[str, Callable[[bytes], object]] = {
    ROUTING_POLICY_KEY: lambda value: effective_routing(RoutingConfig(), value),
    ROUTER_POLICY_KEY: lambda value: effective_router_policy(RouterPolicy(), value),
}


@dataclass(frozen=True)
class PolicyValue:
    """A key of the bucket as read or written: `revision` 0 and `value` None when unset."""

    key: str
    revision: int
    value: bytes | None

    def fields(self) -> dict[str, Any] | None:
        """The value as a JSON object; None when unset; ConfigError when it is not one."""
        return None if self.value is None else parse_override(self.value, self.key)

    def problem(self) -> str:
        """Why the workers refuse this value; "" when they take it (or it is unset)."""
        if self.value is None:
            return ""
        try:
            POLICY_KEYS[self.key](self.value)
        except ConfigError as exc:
            return str(exc)
        return ""

    def rows(self) -> list[tuple[str, str]]:
        text = ("none (the config file is in force)" if self.value is None
                else self.value.decode(errors="replace"))
        return [("key", self.key), ("revision", str(self.revision)), ("value", text),
                ("refused by workers", self.problem() or "no")]

    def to_json(self) -> str:
        try:
            value: Any = self.fields()
        except ConfigError:
            value = self.value.decode(errors="replace") if self.value is not None else None
        return json.dumps({"key": self.key, "revision": self.revision, "value": value,
                           "error": self.problem()}, sort_keys=True)


def edit_fields(current: PolicyValue, assignments: Sequence[str]) -> dict[str, Any]:
    """The new value: one JSON object replaces the whole value; `field=value` pairs
    update the current one (value parsed as JSON, else taken as a string; `field=null`
    drops the field, so the config file's value applies again)."""
    if len(assignments) == 1 and assignments[0].lstrip().startswith("{"):
        return parse_override(assignments[0].encode(), current.key)
    try:
        fields = current.fields() or {}
    except ConfigError as exc:
        raise ConfigError(exc.field, f"revision {current.revision} is no JSON object ({exc}): "
                          "write a whole JSON object, or delete it") from None
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(assignment, "expected FIELD=VALUE (or one JSON object)")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if value is None:
            fields.pop(name, None)
        else:
            fields[name] = value
    return fields


@asynccontextmanager
async def policy_store(broker: BrokerTarget, connect_timeout_s: float
                       ) -> AsyncIterator[PolicyStore]:
    conn = await connect(broker.url, name="splitserve-admin", auth=broker.auth,
                         connect_timeout_s=connect_timeout_s)
    try:
        yield await PolicyStore.bind(conn.js)
    except (nats.errors.Error, APIError, TimeoutError) as exc:
        raise BrokerError(f"{redact_url(broker.url)}: {type(exc).__name__}: {exc}") from exc
    finally:
        await conn.close()


async def read_policy(store: PolicyStore, key: str) -> PolicyValue:
    entry = await store.get(key)
    return (PolicyValue(key, entry.revision, entry.value) if entry is not None
            else PolicyValue(key, 0, None))


def _expect(current: PolicyValue, expected_revision: int | None) -> int:
    """The revision to compare-and-set on; a named one must still be current, since
    `field=value` edits start from the value read."""
    if expected_revision is None:
        return current.revision
    if expected_revision != current.revision:
        raise PolicyConflict(current.key, expected_revision, current.revision)
    return expected_revision


async def get_policy(broker: BrokerTarget, key: str, connect_timeout_s: float) -> PolicyValue:
    async with policy_store(broker, connect_timeout_s) as store:
        return await read_policy(store, key)


async def set_policy(broker: BrokerTarget, key: str, assignments: Sequence[str],
                     expected_revision: int | None, connect_timeout_s: float) -> PolicyValue:
    async with policy_store(broker, connect_timeout_s) as store:
        current = await read_policy(store, key)
        expected = _expect(current, expected_revision)
        value = encode_override(edit_fields(current, assignments))
        POLICY_KEYS[key](value)  # refused here as the workers would refuse it
        revision = await store.put(key, value, expected_revision=expected)
        return PolicyValue(key, revision, value)


async def delete_policy(broker: BrokerTarget, key: str, expected_revision: int | None,
                        connect_timeout_s: float) -> PolicyValue:
    """Delete the key (the config file alone is in force again); the value deleted."""
    async with policy_store(broker, connect_timeout_s) as store:
        current = await read_policy(store, key)
        expected = _expect(current, expected_revision)
        if current.value is not None:
            await store.delete(key, expected_revision=expected)
        return current
