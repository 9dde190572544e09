"""Config hot reload: diff, classification, refusals, and the file watcher."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from splitserve.config.daemon import (
    RELOADABLE_WORKER_FIELDS,
    ClusterConfig,
    WorkerConfig,
    config_hash,
    config_to_yaml,
    load_worker_config,
)
from splitserve.config.reload import ConfigReloader, diff_fields, is_reloadable, with_fields
from splitserve.config.schema import EngineConfig
from splitserve.config.watch import ChangeDetector, watch_file
from splitserve.daemons.up import LocalCluster
from splitserve.routing.offload import RoutingConfig

BASE = WorkerConfig(role="decode", worker_id="decode-0", grpc_address="127.0.0.1:50051",
                    routing=RoutingConfig(prefill_length_threshold=40))


def save_by_rename(path: Path, text: str | bytes, mtime_ns: int | None = None) -> None:
    """What editors do: write a temp file, rename it over the config. An explicit mtime
    keeps two saves in one timestamp tick apart (the kernel's clock is ~4 ms coarse)."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


class Applied:
    def __init__(self) -> None:
        self.configs: list[WorkerConfig] = []

    def __call__(self, config: WorkerConfig) -> None:
        self.configs.append(config)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "decode.yaml"
    path.write_text(config_to_yaml(BASE))
    return path


def reloader_for(path: Path, apply: Applied) -> ConfigReloader[WorkerConfig]:
    load = partial(load_worker_config, role="decode")
    return ConfigReloader(path, load, load(path), reloadable=RELOADABLE_WORKER_FIELDS,
                          apply=apply)


# --- diff and classification ---------------------------------------------------------
def test_diff_names_changed_leaves_in_field_order() -> None:
    new = replace(BASE, log_level="DEBUG", grpc_address="0.0.0.0:1",
                  engine=replace(BASE.engine, page_size=32),
                  routing=replace(BASE.routing, prefill_length_threshold=77,
                                  decode_load_threshold=0.25))
    assert diff_fields(BASE, new) == [
        "grpc_address", "engine.page_size", "routing.prefill_length_threshold",
        "routing.decode_load_threshold", "log_level"]
    assert diff_fields(BASE, BASE) == []


@pytest.mark.parametrize(("name", "reloadable"), [
    ("routing.prefill_length_threshold", True), ("lease.base_s", True),
    ("prefill.max_batch_jobs", True), ("log_level", True), ("drain_grace_s", True),
    ("stats_interval_s", True), ("role", False), ("worker_id", False),
    ("grpc_address", False), ("nats_url", False), ("engine.page_size", False),
    ("engine.cpu_threads", False), ("cpu_threads", False), ("cpu_affinity", False),
])
def test_reloadable_classification(name: str, reloadable: bool) -> None:
    assert is_reloadable(name, RELOADABLE_WORKER_FIELDS) is reloadable


def test_a_prefix_is_not_a_parent() -> None:
    assert not is_reloadable("leases.base_s", {"lease"})
    assert is_reloadable("lease", {"lease"})


def test_with_fields_copies_only_the_named_leaves() -> None:
    source = replace(BASE, engine=replace(BASE.engine, page_size=32),
                     routing=replace(BASE.routing, prefill_length_threshold=77,
                                     prefill_queue_max=3))
    merged = with_fields(BASE, source, ["routing.prefill_length_threshold"])
    assert merged.routing == replace(BASE.routing, prefill_length_threshold=77)
    assert merged.engine == BASE.engine


# --- reloads -------------------------------------------------------------------------
def test_reloadable_change_applies_once_with_new_hash(config_file: Path) -> None:
    apply = Applied()
    reloader = reloader_for(config_file, apply)
    old_hash = reloader.config_hash
    save_by_rename(config_file, config_to_yaml(replace(
        BASE, log_level="DEBUG", lease=replace(BASE.lease, base_s=1.5),
        routing=replace(BASE.routing, prefill_length_threshold=77))))

    result = reloader.reload("test")

    assert result.ok and result.error == ""
    assert result.applied_fields == ("routing.prefill_length_threshold", "lease.base_s",
                                     "log_level")
    assert result.restart_fields == ()
    assert result.config_hash == config_hash(config_file) != old_hash
    (applied,) = apply.configs
    assert applied is reloader.config
    assert (applied.routing.prefill_length_threshold, applied.lease.base_s,
            applied.log_level) == (77, 1.5, "DEBUG")
    assert reloader.status_note == ""


def test_unchanged_file_applies_nothing(config_file: Path) -> None:
    apply = Applied()
    reloader = reloader_for(config_file, apply)
    result = reloader.reload("SIGHUP")
    assert (result.applied_fields, result.restart_fields, result.error) == ((), (), "")
    assert apply.configs == []


def test_restart_only_fields_are_reported_not_applied(
        config_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    apply = Applied()
    reloader = reloader_for(config_file, apply)
    save_by_rename(config_file, config_to_yaml(replace(
        BASE, grpc_address="0.0.0.0:6000", engine=EngineConfig(page_size=32),
        routing=replace(BASE.routing, prefill_queue_max=2))))

    with caplog.at_level(logging.INFO, "splitserve.config.reload"):
        result = reloader.reload("file change")

    assert result.applied_fields == ("routing.prefill_queue_max",)
    assert result.restart_fields == ("grpc_address", "engine.page_size")
    assert reloader.config.grpc_address == BASE.grpc_address
    assert reloader.config.engine.page_size == 16
    assert reloader.config.routing.prefill_queue_max == 2
    assert reloader.status_note == "needs a restart to apply: grpc_address, engine.page_size"
    assert "grpc_address, engine.page_size changed but needs a restart; not applied" in caplog.text
    # Still pending on the next reload (nothing new to apply), until the file goes back.
    again = reloader.reload("SIGHUP")
    assert (again.applied_fields, again.restart_fields) == ((), result.restart_fields)
    assert len(apply.configs) == 1


@pytest.mark.parametrize(("text", "error"), [
    (b"routing: [\n", "invalid YAML"),
    (b"- a list\n", "the top level must be a mapping"),
    (b"routing:\n  prefill_length_threshold: -1\n",
     "routing.prefill_length_threshold: must be >= 0, got -1"),
    (b"routing:\n  prefill_length_treshold: 5\n",
     "routing.prefill_length_treshold: unknown setting"),
    (b"lease:\n  base_s: soon\n", "lease.base_s: expected float, got 'soon'"),
    (b"role: prefill\n", "role: config says 'prefill' but this is the decode daemon"),
    (b"\xff\xfe\x00routing", "UnicodeDecodeError"),  # not even text: refused, never raised
])
def test_refused_file_keeps_the_old_config_and_says_why(
        config_file: Path, text: bytes, error: str, caplog: pytest.LogCaptureFixture) -> None:
    apply = Applied()
    reloader = reloader_for(config_file, apply)
    old, old_hash = reloader.config, reloader.config_hash
    save_by_rename(config_file, text)

    with caplog.at_level(logging.INFO, "splitserve.config.reload"):
        result = reloader.reload("file change")

    assert not result.ok and error in result.error
    assert (result.applied_fields, result.restart_fields) == ((), ())
    assert result.config_hash == reloader.config_hash == old_hash
    assert reloader.config is old and apply.configs == []
    assert reloader.status_note == result.error
    assert "refused, keeping the config in force" in caplog.text


def test_next_good_reload_clears_the_error(config_file: Path) -> None:
    reloader = reloader_for(config_file, Applied())
    good = config_file.read_text()
    save_by_rename(config_file, "routing: [")
    assert reloader.reload("file change").error
    save_by_rename(config_file, good.replace("prefill_length_threshold: 40",
                                             "prefill_length_threshold: 41"))
    result = reloader.reload("file change")
    assert result.ok and result.applied_fields == ("routing.prefill_length_threshold",)
    assert reloader.status_note == ""


def test_missing_file_is_an_error_not_a_crash(config_file: Path) -> None:
    reloader = reloader_for(config_file, Applied())
    old = reloader.config
    config_file.unlink()
    result = reloader.reload("file change")
    assert result.error == f"{config_file}: cannot read config: No such file or directory"
    assert reloader.config is old


def test_failing_apply_keeps_the_old_config(config_file: Path) -> None:
    def apply(config: WorkerConfig) -> None:
        raise RuntimeError("log handler gone")

    load = partial(load_worker_config, role="decode")
    reloader = ConfigReloader(config_file, load, load(config_file),
                              reloadable=RELOADABLE_WORKER_FIELDS, apply=apply)
    old = reloader.config
    save_by_rename(config_file, config_to_yaml(replace(BASE, log_level="ERROR")))
    result = reloader.reload("SIGHUP")
    assert result.error == "applying log_level failed: RuntimeError: log handler gone"
    assert reloader.config is old


# --- the watcher ---------------------------------------------------------------------
def test_detector_sees_save_by_rename_once_it_settles(config_file: Path) -> None:
    changes = ChangeDetector(config_file)
    assert not changes.poll()
    save_by_rename(config_file, "log_level: DEBUG\n", mtime_ns=1_000_000_000)
    assert not changes.poll()  # changed: wait one more poll
    assert changes.poll()  # unchanged since: report it
    assert not changes.poll()


def test_detector_debounces_a_burst_into_one_change(config_file: Path) -> None:
    changes = ChangeDetector(config_file)
    fired = []
    for i in range(4):  # an editor writing in steps, each seen by a poll
        save_by_rename(config_file, f"log_level: DEBUG\n# step {i}\n", mtime_ns=(i + 1) * 10**9)
        fired.append(changes.poll())
    fired += [changes.poll(), changes.poll(), changes.poll()]
    assert fired == [False] * 4 + [True, False, False]


def test_detector_sees_in_place_write_and_delete_then_recreate(config_file: Path) -> None:
    changes = ChangeDetector(config_file)
    inode = config_file.stat().st_ino
    config_file.write_text(config_file.read_text())  # same inode, same size
    os.utime(config_file, ns=(5 * 10**9, 5 * 10**9))
    assert config_file.stat().st_ino == inode
    assert [changes.poll(), changes.poll()] == [False, True]

    config_file.unlink()  # a missing file is a change too (the reload reports it)
    assert [changes.poll(), changes.poll(), changes.poll()] == [False, True, False]
    config_file.write_text("log_level: DEBUG\n")
    assert [changes.poll(), changes.poll()] == [False, True]

    config_file.unlink()  # deleted and recreated between two polls: one change
    config_file.write_text("log_level: INFO\n")
    os.utime(config_file, ns=(7 * 10**9, 7 * 10**9))
    assert [changes.poll(), changes.poll(), changes.poll()] == [False, True, False]


async def test_watch_file_reloads_after_rename_and_survives_a_failing_callback(
        config_file: Path) -> None:
    changes = ChangeDetector(config_file)
    calls: list[int] = []

    def on_change() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("first reload blew up")

    task = asyncio.create_task(watch_file(changes, on_change, interval_s=0.02))
    try:
        save_by_rename(config_file, "log_level: DEBUG\n", mtime_ns=10**9)
        await _wait_for(lambda: len(calls) == 1)
        save_by_rename(config_file, "log_level: INFO\n", mtime_ns=2 * 10**9)
        await _wait_for(lambda: len(calls) == 2)
        await asyncio.sleep(0.2)  # ten more polls: no change, no call
        assert calls == [0, 1]
    finally:
        task.cancel()


async def _wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


# --- splitserve up -------------------------------------------------------------------
def test_up_rewrites_worker_files_from_the_new_template(tmp_path: Path) -> None:
    cluster = ClusterConfig(state_dir=str(tmp_path / "state"), num_prefill_workers=1,
                            worker=replace(BASE, routing=RoutingConfig()))
    local = LocalCluster(cluster)
    local.write_worker_configs()
    paths = [w.config_path for w in local.workers]
    inodes = [p.stat().st_ino for p in paths]
    before = [load_worker_config(p) for p in paths]

    new = replace(cluster, num_decode_workers=2, base_grpc_port=6000,
                  worker=replace(cluster.worker, log_level="DEBUG",
                                 routing=RoutingConfig(prefill_length_threshold=300)))
    layout, rewritten = local.refresh_worker_configs(new)

    assert layout == ["num_decode_workers", "base_grpc_port"]  # need a restart of `up`
    assert rewritten == paths
    assert all(p.stat().st_ino != i for p, i in zip(paths, inodes))  # by rename
    for path, old in zip(paths, before):
        config = load_worker_config(path)
        assert diff_fields(old, config) == ["routing.prefill_length_threshold", "log_level"]
        assert config.routing.prefill_length_threshold == 300
    assert not list(paths[0].parent.glob(".*.tmp"))
    assert local.refresh_worker_configs(new) == (layout, [])  # same again: nothing written
