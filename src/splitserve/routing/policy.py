"""Live routing policy: the config file's `routing:` section, overridden field by field
from the `splitserve-policy` bucket.

Precedence (the bucket overrides the file's fields it names, and only those):
- key `routing` holds a JSON object of `RoutingConfig` field names and values, e.g.
  `{"prefill_length_threshold": 40}`: a partial override;
- effective routing = the file's `routing:` section with those fields replaced,
  validated as the file is (`from_mapping`: names, types, ranges);
- a reload of the file changes the base; the bucket's fields stay on top, so a reload
  never undoes a bucket write (the file's other fields do apply);
- no key (never written, or deleted): the file alone is in force;
- an invalid value (not JSON, not an object, an unknown field, a wrong type, out of
  range) is a `ConfigError` naming the field: the caller keeps the policy in force.

Routers follow key `router` the same way (`effective_router_policy`: cost weights and
QoS limits, merged field by field at any depth).

Pure functions of their inputs, unit-tested in tests/unit/test_policy_routing.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from splitserve.config.router import RouterPolicy
from splitserve.config.schema import from_mapping
from splitserve.errors import ConfigError
from splitserve.routing.offload import RoutingConfig

ROUTING_POLICY_KEY = "routing"  # the key decode workers watch in splitserve-policy
ROUTER_POLICY_KEY = "router"  # the key routers watch: {"weights": {...}, "qos": {...}}


def parse_override(value: bytes, key: str = ROUTING_POLICY_KEY) -> dict[str, Any]:
    """A bucket value as a mapping (names and types not checked yet); ConfigError if it
    is not a JSON object."""
    try:
        data = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"policy.{key}", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        what = "routing" if key == ROUTING_POLICY_KEY else key
        raise ConfigError(f"policy.{key}", f"expected a JSON object of {what} fields, "
                          f"got {data!r}")
    return data


def effective_routing(file_routing: RoutingConfig, override: bytes | None) -> RoutingConfig:
    """The routing in force: `file_routing` with the fields `override` names replaced.
    `override` None (no key in the bucket) gives `file_routing` itself."""
    if override is None:
        return file_routing
    merged = {**dataclasses.asdict(file_routing), **parse_override(override)}
    return from_mapping(RoutingConfig, merged, prefix=f"{ROUTING_POLICY_KEY}.")


def effective_router_policy(file_policy: RouterPolicy, override: bytes | None
                            ) -> RouterPolicy:
    """A router's knobs in force: the file's, with what `override` names replaced, one
    level deep and more (`{"qos": {"reject_above_s": {"low": 1}}}` changes only that
    field); validated as the file is."""
    if override is None:
        return file_policy
    merged = _deep_merge(dataclasses.asdict(file_policy),
                         parse_override(override, ROUTER_POLICY_KEY))
    return from_mapping(RouterPolicy, merged, prefix=f"{ROUTER_POLICY_KEY}.")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def encode_override(fields: dict[str, Any]) -> bytes:
    """The bucket value for `fields` (sorted keys: equal overrides, equal bytes)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
