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

Pure functions of their inputs, unit-tested in tests/unit/test_policy_routing.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from splitserve.config.schema import from_mapping
from splitserve.errors import ConfigError
from splitserve.routing.offload import RoutingConfig

ROUTING_POLICY_KEY = "routing"  # the key decode workers watch in splitserve-policy


def parse_override(value: bytes) -> dict[str, Any]:
    """A bucket value as a mapping (names and types not checked yet); ConfigError if it
    is not a JSON object."""
    try:
        data = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(f"policy.{ROUTING_POLICY_KEY}", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"policy.{ROUTING_POLICY_KEY}",
                          f"expected a JSON object of routing fields, got {data!r}")
    return data


def effective_routing(file_routing: RoutingConfig, override: bytes | None) -> RoutingConfig:
    """The routing in force: `file_routing` with the fields `override` names replaced.
    `override` None (no key in the bucket) gives `file_routing` itself."""
    if override is None:
        return file_routing
    merged = {**dataclasses.asdict(file_routing), **parse_override(override)}
    return from_mapping(RoutingConfig, merged, prefix=f"{ROUTING_POLICY_KEY}.")


def encode_override(fields: dict[str, Any]) -> bytes:
    """The bucket value for `fields` (sorted keys: equal overrides, equal bytes)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
