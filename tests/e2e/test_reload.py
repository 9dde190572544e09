"""Config hot reload of a real decode worker daemon (subprocess, real nats-server).

One daemon serves the whole module (start-up is ~15 s on 2 cores). Every test
writes a complete config file derived from the one the daemon started with, so
the tests do not depend on each other's order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml
from cluster import (
    GRPCURL,
    SPLITSERVE,
    Daemon,
    generate,
    nats_server,
    start_daemon,
    stop_daemons,
    wait_ready,
    worker_config,
)

from splitserve.config.daemon import WorkerConfig, config_hash, config_to_yaml
from splitserve.rpc import admin_pb2, admin_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WAIT_S = 20.0  # the watcher reacts within ~1 s; the rest is slack for a busy machine


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("reload")
    broker = nats_server(workdir)
    worker = start_daemon(worker_config("decode", "decode-reload", broker.url), workdir)
    try:
        wait_ready([worker])
        yield worker
    finally:
        stop_daemons([worker])
        broker.stop()


def config_path(d: Daemon) -> Path:
    return d.log_path.with_suffix(".yaml")  # where start_daemon wrote it


def save_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.edit")
    tmp.write_text(text)
    os.replace(tmp, path)


def with_threshold(d: Daemon, threshold: int) -> WorkerConfig:
    return replace(d.config, routing=replace(d.config.routing,
                                             prefill_length_threshold=threshold))


def admin(d: Daemon, method: str, request: object) -> object:
    with grpc.insecure_channel(d.address) as channel:
        return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=10)


def status(d: Daemon) -> admin_pb2.GetStatusResponse:
    reply = admin(d, "GetStatus", admin_pb2.GetStatusRequest())
    assert isinstance(reply, admin_pb2.GetStatusResponse)
    return reply


def threshold_in_force(d: Daemon) -> int:
    reply = admin(d, "GetConfig", admin_pb2.GetConfigRequest())
    assert isinstance(reply, admin_pb2.GetConfigResponse)
    return int(yaml.safe_load(reply.config_yaml)["routing"]["prefill_length_threshold"])


def wait_until(predicate: Callable[[], bool], what: str, d: Daemon) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; log:\n{d.log_tail()}")
        time.sleep(0.1)


def test_save_by_rename_applies_the_threshold(daemon: Daemon) -> None:
    path = config_path(daemon)
    before = status(daemon).config_hash
    assert before == config_hash(path)

    save_by_rename(path, config_to_yaml(with_threshold(daemon, 77)))

    wait_until(lambda: status(daemon).config_hash == config_hash(path), "the new hash", daemon)
    assert status(daemon).config_hash != before
    assert status(daemon).config_reload_error == ""
    assert threshold_in_force(daemon) == 77
    assert "applied routing.prefill_length_threshold=77" in daemon.log_path.read_text()


def test_bad_yaml_is_refused_and_the_worker_keeps_serving(daemon: Daemon) -> None:
    path = config_path(daemon)
    save_by_rename(path, config_to_yaml(with_threshold(daemon, 60)))
    wait_until(lambda: threshold_in_force(daemon) == 60, "threshold 60", daemon)
    good_hash = status(daemon).config_hash

    save_by_rename(path, "routing: [\n  prefill_length_threshold: 5\n")

    wait_until(lambda: status(daemon).config_reload_error != "", "the reload error", daemon)
    st = status(daemon)
    assert "invalid YAML" in st.config_reload_error and str(path) in st.config_reload_error
    assert st.config_hash == good_hash
    assert threshold_in_force(daemon) == 60  # the old config stays in force
    tokens, _ = generate(daemon.address, list(range(100, 110)), max_tokens=4)
    assert len(tokens) == 4
    assert daemon.process.poll() is None

    save_by_rename(path, config_to_yaml(with_threshold(daemon, 61)))  # fixed: error clears
    wait_until(lambda: status(daemon).config_reload_error == "", "the error to clear", daemon)
    assert threshold_in_force(daemon) == 61


def test_sighup_reloads(daemon: Daemon) -> None:
    path = config_path(daemon)
    save_by_rename(path, config_to_yaml(with_threshold(daemon, 90)))
    wait_until(lambda: threshold_in_force(daemon) == 90, "threshold 90", daemon)

    daemon.signal(signal.SIGHUP)  # file unchanged: only SIGHUP can cause this reload

    wait_until(lambda: "reloaded (SIGHUP): no changes" in daemon.log_path.read_text(),
               "the SIGHUP reload", daemon)
    assert daemon.process.poll() is None  # SIGHUP's default action would have killed it
    assert status(daemon).config_reload_error == ""


def test_grpcurl_reload_reports_fields_that_need_a_restart(daemon: Daemon) -> None:
    path = config_path(daemon)
    changed = with_threshold(daemon, 100)
    save_by_rename(path, config_to_yaml(
        replace(changed, engine=replace(changed.engine, page_size=32))))

    out = subprocess.run([GRPCURL, "-plaintext", daemon.address, "splitserve.v1.Admin/Reload"],
                         capture_output=True, text=True, check=False, timeout=30)

    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    # The watcher may have applied the threshold first; the restart field stays pending.
    assert reply.get("applied_fields", []) in ([], ["routing.prefill_length_threshold"])
    assert reply["restart_fields"] == ["engine.page_size"]
    assert "error" not in reply and reply["config_hash"] == config_hash(path)
    assert threshold_in_force(daemon) == 100
    assert status(daemon).config_reload_error == "needs a restart to apply: engine.page_size"
    assert "engine.page_size changed but needs a restart" in daemon.log_path.read_text()

    save_by_rename(path, config_to_yaml(changed))  # page size back: nothing pending
    res = subprocess.run([*SPLITSERVE, "admin", "reload", "--target", daemon.address, "--json"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["restart_fields"] == []
    assert status(daemon).config_reload_error == ""
