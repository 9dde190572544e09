"""The live routing policy's precedence (`routing.policy`): the bucket's named fields
over the config file's `routing:` section, validated as the file is."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.config.router import CostWeights, PerClass, QosConfig, RouterPolicy
from splitserve.errors import ConfigError
from splitserve.policy_admin import PolicyValue, edit_fields
from splitserve.queue.kv_watch import KVEvent
from splitserve.router.policy_watch import RouterPolicyWatch
from splitserve.routing.offload import RoutingConfig, should_offload_prefill
from splitserve.routing.policy import (
    effective_router_policy,
    effective_routing,
    encode_override,
    parse_override,
)

FILE = RoutingConfig(prefill_length_threshold=128, moderate_length_threshold=48,
                     max_remote_attempts=3)


def test_no_key_is_the_file_itself() -> None:
    assert effective_routing(FILE, None) is FILE


def test_the_bucket_replaces_only_the_fields_it_names() -> None:
    effective = effective_routing(FILE, b'{"prefill_length_threshold": 40}')
    assert effective == replace(FILE, prefill_length_threshold=40)
    assert effective_routing(FILE, b"{}") == FILE


def test_a_file_reload_changes_the_base_and_the_bucket_fields_stay_on_top() -> None:
    override = b'{"prefill_length_threshold": 40, "decode_load_threshold": 0}'
    reloaded = replace(FILE, prefill_length_threshold=500, max_remote_attempts=1,
                       moderate_length_threshold=20)
    effective = effective_routing(reloaded, override)
    assert effective.prefill_length_threshold == 40  # the bucket's, not the reload's 500
    assert effective.decode_load_threshold == 0.0  # int in JSON, float field
    assert (effective.max_remote_attempts, effective.moderate_length_threshold) == (1, 20)


def test_the_threshold_in_force_decides_the_offload() -> None:
    local = effective_routing(FILE, b'{"prefill_length_threshold": 1000}')
    remote = effective_routing(FILE, b'{"prefill_length_threshold": 40}')
    assert not should_offload_prefill(local, 60, 0, 0.0)
    assert should_offload_prefill(remote, 60, 0, 0.0)


@pytest.mark.parametrize("value,message", [
    (b"{not json", "policy.routing: not valid JSON"),
    (b"\xff\xfe", "policy.routing: not valid JSON"),
    (b"[1, 2]", "policy.routing: expected a JSON object of routing fields, got [1, 2]"),
    (b"40", "policy.routing: expected a JSON object of routing fields, got 40"),
    (b'{"prefill_length_threshhold": 40}', "routing.prefill_length_threshhold: unknown setting"),
    (b'{"prefill_length_threshold": -1}',
     "routing.prefill_length_threshold: must be >= 0, got -1"),
    (b'{"prefill_length_threshold": 40.5}',
     "routing.prefill_length_threshold: expected int, got 40.5"),
    (b'{"prefill_length_threshold": "40"}',
     "routing.prefill_length_threshold: expected int, got '40'"),
    (b'{"enable_remote_prefill": 1}', "routing.enable_remote_prefill: expected bool, got 1"),
    (b'{"max_remote_attempts": 40}', "routing.max_remote_attempts: must be <= 16, got 40"),
    (b'{"decode_load_threshold": NaN}', "routing.decode_load_threshold: must be in [0, 1]"),
    (b'{"prefill_length_threshold": null}', "routing.prefill_length_threshold: expected int"),
])
def test_an_invalid_value_is_refused_naming_the_field(value: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        effective_routing(FILE, value)
    assert str(info.value).startswith(message), str(info.value)


def test_encode_is_canonical_and_parses_back() -> None:
    value = encode_override({"moderate_length_threshold": 30, "prefill_length_threshold": 40})
    assert value == b'{"moderate_length_threshold":30,"prefill_length_threshold":40}'
    assert parse_override(value) == {"moderate_length_threshold": 30,
                                     "prefill_length_threshold": 40}


# --- the admin CLI's edit of a value (policy_admin.edit_fields) ---------------------------
CURRENT = PolicyValue("routing", 7, b'{"moderate_length_threshold":30,"prefill_length_threshold":40}')


def test_assignments_update_the_current_value_and_null_drops_a_field() -> None:
    assert edit_fields(CURRENT, ["prefill_length_threshold=64", "decode_load_threshold=0.25",
                                 "enable_remote_prefill=false"]) == {
        "moderate_length_threshold": 30, "prefill_length_threshold": 64,
        "decode_load_threshold": 0.25, "enable_remote_prefill": False}
    assert edit_fields(CURRENT, ["moderate_length_threshold=null"]) == {
        "prefill_length_threshold": 40}
    assert edit_fields(PolicyValue("routing", 0, None), ["prefill_queue_max=4"]) == {
        "prefill_queue_max": 4}


def test_a_json_object_replaces_the_whole_value() -> None:
    assert edit_fields(CURRENT, ['{"max_remote_attempts": 1}']) == {"max_remote_attempts": 1}
    garbage = PolicyValue("routing", 9, b"oops")
    assert edit_fields(garbage, ["{}"]) == {}
    with pytest.raises(ConfigError, match="revision 9 is no JSON object"):
        edit_fields(garbage, ["prefill_queue_max=4"])


@pytest.mark.parametrize("assignment", ["prefill_length_threshold", "=40", " =40"])
def test_an_assignment_without_a_field_name_is_refused(assignment: str) -> None:
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        edit_fields(CURRENT, [assignment])


# --- the router's key: cost weights and QoS, merged at any depth -----------------------

def test_the_router_key_overrides_only_what_it_names() -> None:
    file_policy = RouterPolicy(CostWeights(active=2.0), QosConfig(max_in_flight=10))
    policy = effective_router_policy(file_policy, b'{"qos": {"reject_above_s": {"low": 0.5}},'
                                                  b' "weights": {"cached_prefix": 4}}')
    assert policy.weights == CostWeights(active=2.0, cached_prefix=4.0)
    assert policy.qos.reject_above_s == PerClass(normal=8.0, low=0.5)
    assert policy.qos.max_in_flight == 10  # from the file
    assert effective_router_policy(file_policy, None) is file_policy


@pytest.mark.parametrize(("value", "field"), [
    (b'{"qos": {"reject_above_s": {"urgent": 1}}}', "router.qos.reject_above_s.urgent"),
    (b'{"weights": {"active": "x"}}', "router.weights.active"),
    (b'{"speed": 1}', "router.speed"),
    (b"[1]", "policy.router"),
])
def test_a_bad_router_value_names_the_field(value: bytes, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        effective_router_policy(RouterPolicy(), value)
    assert err.value.field == field


def test_the_router_watch_applies_refuses_and_restores() -> None:
    applied: list[RouterPolicy] = []
    watch = RouterPolicyWatch(RouterPolicy(), applied.append)
    watch.on_entry(KVEvent("router", b'{"qos": {"admission": false}}', 3, True))
    assert watch.revision == 3 and applied[-1].qos.admission is False
    watch.on_entry(KVEvent("router", b'{"qos": {"max_in_flight": 0}}', 4, False))
    assert watch.revision == 3 and "revision 4 refused" in watch.error and len(applied) == 1
    watch.on_entry(KVEvent("router", b'{"qos": {"admission": true}}', 4, False))  # not newer
    assert len(applied) == 1
    watch.on_entry(KVEvent("router", None, 5, False))  # deleted: the file again
    assert watch.revision == 0 and applied[-1] == RouterPolicy() and watch.error == ""
