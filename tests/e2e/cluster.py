"""Daemons as subprocesses around a real nats-server, for end-to-end tests and benchmarks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config.daemon import WorkerConfig
from splitserve.config.router import RouterConfig
from splitserve.config.schema import EngineConfig
from splitserve.daemons.up import health_serving, write_config
from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.routing.offload import RoutingConfig
from splitserve.rpc import generation_pb2, generation_pb2_grpc

SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


@dataclasses.dataclass
class Daemon:
    config: WorkerConfig
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return self.config.grpc_address

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def log_tail(self, num_lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def exit_code(self, timeout_s: float = 60.0) -> int:
        """The exit code; on a hang, the failure shows the log with every thread's stack
        (the daemons run with PYTHONFAULTHANDLER=1: SIGABRT dumps them)."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
            raise AssertionError(f"{self.config.worker_id} did not exit within {timeout_s} s:"
                                 f"\n{self.log_tail(200)}") from None


def worker_config(role: str, worker_id: str, nats_url: str, **overrides: object) -> WorkerConfig:
    base = WorkerConfig(
        role=role, worker_id=worker_id,  # type: ignore[arg-type]
        grpc_address=f"127.0.0.1:{find_free_port()}", nats_url=nats_url,
        engine=EngineConfig(kv_cache_memory_mb=96, max_num_seqs=16),
        routing=RoutingConfig(prefill_length_threshold=40, moderate_length_threshold=40),
        drain_grace_s=5.0, log_level="INFO")
    return replace(base, **overrides)  # type: ignore[arg-type]


def start_daemon(config: WorkerConfig, workdir: Path) -> Daemon:
    path = workdir / f"{config.worker_id}.yaml"
    write_config(config, path)
    log_path = workdir / f"{config.worker_id}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen([*SPLITSERVE, config.role, "--config", str(path)],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    return Daemon(config, log_path, process)


def wait_ready(daemons: list[Daemon], timeout_s: float = 120.0, ca_file: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(daemons)
    while pending:
        for d in list(pending):
            if d.process.poll() is not None:
                raise RuntimeError(f"{d.config.worker_id} exited:\n{d.log_tail()}")
            if health_serving(d.address, ca_file=ca_file):
                pending.remove(d)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not ready: {[d.config.worker_id for d in pending]}\n"
                               + "\n".join(d.log_tail() for d in pending))
        time.sleep(0.2)


def stop_daemons(daemons: list[Daemon]) -> None:
    for d in daemons:
        if d.process.poll() is None:
            d.signal(signal.SIGCONT)
            d.signal(signal.SIGTERM)
    for d in daemons:
        try:
            d.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            d.process.kill()
            d.process.wait()


def generate(address: str, token_ids: list[int], max_tokens: int = 16,
             timeout_s: float = 120.0, **fields: object) -> tuple[list[int], object]:
    """Generation over gRPC (greedy unless `fields` say otherwise); returns the token
    ids and the last chunk."""
    fields.setdefault("temperature", 0.0)
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(token_ids=token_ids, max_tokens=max_tokens,
                                                 **fields)
        tokens: list[int] = []
        last = None
        for chunk in stub.Generate(request, timeout=timeout_s):
            tokens += list(chunk.token_ids)
            last = chunk
    return tokens, last


def nats_server(workdir: Path) -> NatsServer:
    server = NatsServer(find_free_port(), workdir / "nats", log_path=workdir / "nats.log")
    server.start()
    return server


def admin_status(address: str) -> dict:
    """`Admin/GetStatus` through grpcurl and server reflection, as an operator calls it."""
    out = subprocess.run([GRPCURL, "-plaintext", "-d", "{}", address,
                          "splitserve.v1.Admin/GetStatus"], capture_output=True, text=True,
                         check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@contextlib.contextmanager
def decode_and_prefill(workdir: Path) -> Iterator[tuple[NatsServer, Daemon, Daemon]]:
    """A broker with decode-0 and prefill-0 (`worker_config`'s defaults), ready; all
    stopped when the block ends."""
    broker = nats_server(workdir)
    daemons = [start_daemon(worker_config(role, f"{role}-0", broker.url), workdir)
               for role in ("decode", "prefill")]
    try:
        wait_ready(daemons)
        yield broker, daemons[0], daemons[1]
    finally:
        stop_daemons(daemons)
        broker.stop()


def wait_no_leaks(address: str, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = admin_status(address)
        used = int(s.get("num_pages_used", 0))
        quarantined = int(s.get("num_pages_quarantined", 0))
        if (used == 0 and quarantined == 0) or time.monotonic() > deadline:
            assert used == 0 and quarantined == 0, s
            return s
        time.sleep(0.3)


@dataclasses.dataclass
class Router(Daemon):
    config: RouterConfig  # type: ignore[assignment]

    @property
    def address(self) -> str:
        return self.config.grpc_address

    @property
    def base_url(self) -> str:
        return f"http://{self.config.http_address}/v1"


def start_router(nats_url: str, workdir: Path, **overrides: object) -> Router:
    config = RouterConfig(http_address=f"127.0.0.1:{find_free_port()}",
                          grpc_address=f"127.0.0.1:{find_free_port()}", nats_url=nats_url,
                          drain_grace_s=5.0, unavailable_backoff_s=2.0)
    config = replace(config, **overrides)  # type: ignore[arg-type]
    path = workdir / "router.yaml"
    write_config(config, path)
    log_path = workdir / "router.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen([*SPLITSERVE, "router", "--config", str(path)],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
    return Router(config, log_path, process)


def router_health(router: Router) -> dict:
    """GET /health (any status), or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{router.config.http_address}/health",
                                    timeout=5) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except OSError:
        return {}


def router_metrics(router: Router) -> dict[str, float]:
    """GET /metrics: `name{labels}` (labels sorted) → value."""
    with urllib.request.urlopen(f"http://{router.config.http_address}/metrics",
                                timeout=10) as reply:
        text = reply.read().decode()
    return {f"{s.name}{_labels(s.labels)}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels \
        else ""


def wait_router(router: Router, num_workers: int, timeout_s: float = 120.0) -> None:
    """Until the router answers and sees `num_workers` decode workers serving."""
    deadline = time.monotonic() + timeout_s
    while router_health(router).get("num_workers_serving") != num_workers:
        if router.process.poll() is not None:
            raise RuntimeError(f"router exited:\n{router.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"router not ready: {router_health(router)}\n{router.log_tail()}")
        time.sleep(0.2)


def stop_router(router: Router) -> int:
    if router.process.poll() is None:
        router.process.send_signal(signal.SIGTERM)
    try:
        return router.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        router.process.kill()
        return router.process.wait()
