"""Reloadable worker settings have bounds: a value outside them refuses the whole reload."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from splitserve.config.daemon import (
    RELOADABLE_WORKER_FIELDS,
    LeaseConfig,
    PrefillRoleConfig,
    WorkerConfig,
    config_to_yaml,
    load_cluster_config,
    load_worker_config,
)
from splitserve.config.reload import ConfigReloader
from splitserve.errors import ConfigError
from splitserve.routing.offload import RoutingConfig

BASE = WorkerConfig(role="decode", worker_id="decode-0")

# (dotted field, value outside its bounds)
OUT_OF_BOUNDS: list[tuple[str, Any]] = [
    ("lease.base_s", 0.0), ("lease.base_s", -1.0), ("lease.base_s", 3601.0),
    ("lease.base_s", float("nan")),
    ("lease.per_token_ms", -0.5), ("lease.per_token_ms", 1001.0),
    ("lease.skew_margin_s", -0.1), ("lease.skew_margin_s", 60.0),
    ("lease.skew_margin_s", 5.0),  # not below base_s (5.0)
    ("prefill.max_batch_jobs", 0), ("prefill.max_batch_jobs", 1025),
    ("prefill.batch_window_ms", -1.0), ("prefill.batch_window_ms", 10_001.0),
    ("prefill.nak_delay_s", -0.1), ("prefill.nak_delay_s", 601.0),
    ("prefill.transfer_timeout_s", 0.0), ("prefill.transfer_timeout_s", -5.0),
    ("prefill.transfer_timeout_s", 600.5), ("prefill.transfer_timeout_s", float("inf")),
    ("drain_grace_s", -10.0), ("drain_grace_s", 60.5), ("drain_grace_s", float("nan")),
    ("stats_interval_s", 0.0), ("stats_interval_s", 3601.0),
    ("routing.max_remote_attempts", 0), ("routing.max_remote_attempts", 17),
    ("routing.prefill_length_threshold", -1), ("routing.prefill_length_threshold", 1 << 25),
    ("routing.moderate_length_threshold", (1 << 24) + 1),
    ("routing.prefill_queue_max", 1 << 17), ("routing.moderate_queue_max", -1),
    ("routing.decode_load_threshold", float("nan")),
]

# (dotted field, value at the edge of its bounds: accepted)
AT_THE_EDGE: list[tuple[str, Any]] = [
    ("lease.per_token_ms", 0.0), ("lease.skew_margin_s", 0.0), ("lease.base_s", 3600.0),
    ("prefill.max_batch_jobs", 1024), ("prefill.batch_window_ms", 0.0),
    ("prefill.nak_delay_s", 0.0), ("prefill.transfer_timeout_s", 600.0),
    ("drain_grace_s", 0.0), ("drain_grace_s", 60.0), ("stats_interval_s", 3600.0),
    ("routing.max_remote_attempts", 16), ("routing.prefill_queue_max", 1 << 16),
]


def with_value(name: str, value: Any) -> dict[str, Any]:
    data = yaml.safe_load(config_to_yaml(BASE))
    *parents, leaf = name.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    return data


@pytest.fixture
def reloader(tmp_path: Path) -> ConfigReloader[WorkerConfig]:
    path = tmp_path / "decode.yaml"
    path.write_text(config_to_yaml(BASE))
    load = partial(load_worker_config, role="decode")
    applied: list[WorkerConfig] = []
    reloader = ConfigReloader(path, load, load(path), reloadable=RELOADABLE_WORKER_FIELDS,
                              apply=applied.append)
    reloader.applied = applied  # type: ignore[attr-defined]
    return reloader


@pytest.mark.parametrize(("name", "value"), OUT_OF_BOUNDS)
def test_out_of_bounds_reloadable_value_refuses_the_reload(
        reloader: ConfigReloader[WorkerConfig], name: str, value: Any) -> None:
    old, old_hash = reloader.config, reloader.config_hash
    # a valid change next to the bad one: the whole file is refused, not just the field
    data = with_value(name, value)
    data["log_level"] = "DEBUG"
    reloader.path.write_text(yaml.safe_dump(data))

    result = reloader.reload("test")

    assert not result.ok
    assert result.error.startswith(f"{name}: must be")
    assert result.applied_fields == () and result.restart_fields == ()
    assert reloader.config is old
    assert reloader.config_hash == old_hash == result.config_hash
    assert reloader.applied == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "value"), AT_THE_EDGE)
def test_values_at_the_bounds_apply(reloader: ConfigReloader[WorkerConfig], name: str,
                                    value: Any) -> None:
    reloader.path.write_text(yaml.safe_dump(with_value(name, value)))

    result = reloader.reload("test")

    assert result.ok, result.error
    assert result.applied_fields == (name,)
    node: Any = reloader.config
    for part in name.split("."):
        node = getattr(node, part)
    assert node == value


def test_transfer_timeout_zero_names_the_field_and_interval() -> None:
    with pytest.raises(ConfigError) as err:
        PrefillRoleConfig(transfer_timeout_s=0)
    assert err.value.field == "prefill.transfer_timeout_s"
    assert str(err.value) == "prefill.transfer_timeout_s: must be in (0, 600], got 0"


def test_negative_drain_grace_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        WorkerConfig(drain_grace_s=-10)
    assert err.value.field == "drain_grace_s"
    assert str(err.value) == "drain_grace_s: must be in [0, 60], got -10"


@pytest.mark.parametrize(("text", "field"), [
    ("worker:\n  drain_grace_s: -5\n", "worker.drain_grace_s"),
    ("worker:\n  prefill:\n    transfer_timeout_s: 0\n", "worker.prefill.transfer_timeout_s"),
    ("worker:\n  lease:\n    base_s: 1.0\n    skew_margin_s: 2.0\n",
     "worker.lease.skew_margin_s"),
    ("num_prefill_workers: -1\n", "num_prefill_workers"),
])
def test_cluster_config_errors_name_the_full_path(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster_config(path)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_skew_margin_must_be_below_the_base_lease() -> None:
    with pytest.raises(ConfigError) as err:
        LeaseConfig(base_s=1.0, skew_margin_s=1.0)
    assert err.value.field == "lease.skew_margin_s"


def test_defaults_are_inside_their_bounds() -> None:
    for config in (LeaseConfig(), PrefillRoleConfig(), RoutingConfig(), WorkerConfig()):
        assert dataclasses.replace(config) == config
