"""A real worker daemon speaks systemd's notify protocol to a datagram socket the test
binds, as systemd would: READY=1 once SERVING, WATCHDOG=1 every WATCHDOG_USEC/2,
RELOADING=1 with MONOTONIC_USEC and READY=1 around a SIGHUP reload, STOPPING=1 when
SIGTERM starts the drain, then exit 0; after an engine crash STOPPING=1, no more pings,
exit 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cluster import SPLITSERVE, Daemon, generate, nats_server, stop_daemons, worker_config

from splitserve.config.daemon import FaultConfig, WorkerConfig
from splitserve.daemons.notify import monotonic_usec
from splitserve.daemons.up import health_serving, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s


class Inbox:
    """Every notification the daemon sent, in order; `wait_for` receives until one
    matches, failing early if the daemon exits."""

    def __init__(self, sock: socket.socket, daemon: Daemon) -> None:
        self.sock = sock
        self.daemon = daemon
        self.messages: list[dict[str, str]] = []

    def wait_for(self, match: Callable[[dict[str, str]], bool], timeout_s: float,
                 ) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                datagram = self.sock.recv(4096)
            except TimeoutError:
                if self.daemon.process.poll() is not None:
                    break
                continue
            message = dict(line.split("=", 1) for line in datagram.decode().split("\n"))
            self.messages.append(message)
            if match(message):
                return message
        raise AssertionError(f"no such notification within {timeout_s} s; got "
                             f"{self.messages}\n{self.daemon.log_tail()}")

    def wait_for_pings(self, num_pings: int, timeout_s: float = 30.0) -> None:
        for _ in range(num_pings):
            self.wait_for(lambda m: m.get("WATCHDOG") == "1", timeout_s)


def sequence(messages: list[dict[str, str]]) -> str:
    """One letter per notification: R(EADY), L (RELOADING), S(TOPPING), . (WATCHDOG),
    s (STATUS alone)."""
    letters = {"READY": "R", "RELOADING": "L", "STOPPING": "S", "WATCHDOG": "."}
    return "".join(next((v for k, v in letters.items() if k in m), "s") for m in messages)


def start_notifying_daemon(config: WorkerConfig, workdir: Path, notify_name: str) -> Daemon:
    """The worker as systemd would start it: NOTIFY_SOCKET and WATCHDOG_USEC set."""
    config_path = workdir / f"{config.worker_id}.yaml"
    write_config(config, config_path)
    log_path = workdir / f"{config.worker_id}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "NOTIFY_SOCKET": f"@{notify_name}",
           "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with log_path.open("ab") as log_file:
        process = subprocess.Popen([*SPLITSERVE, config.role, "--config", str(config_path)],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return Daemon(config, log_path, process)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in the abstract namespace (NOTIFY_SOCKET's "@") and its name."""
    name = f"splitserve-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(0.5)
        yield sock, name


def test_ready_watchdog_reloading_stopping_in_order(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    broker = nats_server(tmp_path)
    daemon = start_notifying_daemon(worker_config("decode", "decode-notify", broker.url),
                                    tmp_path, name)
    inbox = Inbox(sock, daemon)
    try:
        ready = inbox.wait_for(lambda m: "READY" in m, timeout_s=180)
        assert health_serving(daemon.address)  # READY=1 comes after SERVING
        assert ready["STATUS"].startswith("serving: decode worker decode-notify")
        inbox.wait_for_pings(3)

        sent_usec = monotonic_usec()
        daemon.signal(signal.SIGHUP)
        reloading = inbox.wait_for(lambda m: "RELOADING" in m, timeout_s=30)
        assert sent_usec <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        assert reloading["STATUS"] == "reloading config (SIGHUP)"
        reloaded = inbox.wait_for(lambda m: "READY" in m, timeout_s=30)
        assert reloaded["STATUS"].startswith("serving; last reload (SIGHUP): config ")
        inbox.wait_for_pings(3)  # the pings go on after the reload

        daemon.signal(signal.SIGTERM)
        stopping = inbox.wait_for(lambda m: "STOPPING" in m, timeout_s=30)
        assert stopping["STATUS"] == "draining (grace 5 s)"
        assert daemon.exit_code() == 0
    finally:
        stop_daemons([daemon])
        broker.stop()
    # in order (a busy machine may add a STATUS line about a slow engine thread), with
    # pings while serving before and after the reload, and maybe while draining
    got = sequence(inbox.messages)
    assert re.fullmatch(r"R[.s]*L[.s]*R[.s]*S[.s]*", got), inbox.messages
    assert got.split("L")[0].count(".") >= 3 and got.split("L")[1].count(".") >= 3, got


def test_engine_crash_says_stopping_and_the_pings_end(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, name = notify_socket
    broker = nats_server(tmp_path)
    config = worker_config("decode", "decode-crash", broker.url,
                           faults=FaultConfig(crash_engine_after_steps=3))
    daemon = start_notifying_daemon(config, tmp_path, name)
    inbox = Inbox(sock, daemon)
    try:
        inbox.wait_for(lambda m: "READY" in m, timeout_s=180)
        inbox.wait_for_pings(2)
        with pytest.raises(grpc.RpcError):
            generate(daemon.address, list(range(100, 120)), max_tokens=16)
        stopping = inbox.wait_for(lambda m: "STOPPING" in m, timeout_s=30)
        assert stopping["STATUS"].startswith("engine crashed (")
        assert daemon.exit_code() == 1
    finally:
        stop_daemons([daemon])
        broker.stop()
    while True:  # whatever was still queued: no ping after STOPPING
        try:
            inbox.messages.append({"late": sock.recv(4096).decode()})
        except TimeoutError:
            break
    got = sequence(inbox.messages)
    assert re.fullmatch(r"R[.s]*S", got) and got.count(".") >= 2, inbox.messages
