"""The chaos suite's local cluster: a nats-server (or a 3-node NATS cluster) and worker
daemons as subprocesses, with the signals, restarts and Admin calls the faults need.

Adapted from tests/e2e/cluster.py (benchmarks do not import tests). Admin calls go
through the generated `AdminStub` over grpc.aio; a dead or frozen worker answers None.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import grpc
import nats
import yaml
from nats.js.api import StreamInfo

from splitserve.config.daemon import LeaseConfig, WorkerConfig, config_to_yaml
from splitserve.config.schema import EngineConfig, NatsConfig
from splitserve.daemons.up import health_serving, write_config
from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.cluster import NatsCluster, free_node_ports
from splitserve.queue.subjects import STREAM_PREFILL
from splitserve.routing.offload import RoutingConfig
from splitserve.rpc import admin_pb2, admin_pb2_grpc

SPLITSERVE = [sys.executable, "-m", "splitserve.cli"]
# Short leases resolve a fault in seconds: a 400-token prompt's lease is 3.8 s.
# max_s: renewals (and the sizing) never hold an attempt's pages past 12 s
LEASE = LeaseConfig(base_s=3.0, per_token_ms=2.0, skew_margin_s=0.3, max_s=12.0)
# One torch thread per worker: two workers and the client share 2 cores.
ENGINE = EngineConfig(kv_cache_memory_mb=96, max_num_seqs=16)
ROUTING = RoutingConfig(prefill_length_threshold=40, moderate_length_threshold=40)
COUNTER_NAMES = tuple(f.name for f in admin_pb2.GetStatusResponse.Counters.DESCRIPTOR.fields)


def worker_config(role: str, worker_id: str, nats_url: str, *, replicas: int = 1,
                  **overrides: object) -> WorkerConfig:
    base = WorkerConfig(
        role=role, worker_id=worker_id,  # type: ignore[arg-type]
        grpc_address=f"127.0.0.1:{find_free_port()}", nats_url=nats_url, engine=ENGINE,
        routing=ROUTING, lease=LEASE, nats=NatsConfig(replicas=replicas), cpu_threads=1,
        drain_grace_s=5.0, log_level="INFO")
    return replace(base, **overrides)  # type: ignore[arg-type]


@dataclasses.dataclass
class Daemon:
    config: WorkerConfig
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def worker_id(self) -> str:
        return self.config.worker_id

    @property
    def address(self) -> str:
        return self.config.grpc_address

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.process.send_signal(sig)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, num_lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-num_lines:])


def start_daemon(config: WorkerConfig, workdir: Path) -> Daemon:
    path = workdir / f"{config.worker_id}.yaml"
    write_config(config, path)
    log_path = workdir / f"{config.worker_id}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen([*SPLITSERVE, config.role, "--config", str(path)],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Daemon(config, path, log_path, process)


def wait_ready(daemons: Iterable[Daemon], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(daemons)
    while pending:
        for d in list(pending):
            if not d.alive:
                raise RuntimeError(f"{d.worker_id} exited:\n{d.log_tail()}")
            if health_serving(d.address):
                pending.remove(d)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not ready: {[d.worker_id for d in pending]}")
        time.sleep(0.2)


def stop_daemons(daemons: Iterable[Daemon]) -> None:
    daemons = [d for d in daemons if d.alive]
    for d in daemons:
        d.signal(signal.SIGCONT)
        d.signal(signal.SIGTERM)
    for d in daemons:
        try:
            d.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            d.process.kill()
            d.process.wait()


class Cluster:
    """A broker (one server, or a 3-node cluster) and the worker daemons on it.

    Daemons are keyed by worker id; `restart` starts the same config again (same id,
    same gRPC port, new incarnation)."""

    def __init__(self, workdir: Path, num_nats_nodes: int = 1) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.nats: NatsServer | NatsCluster
        if num_nats_nodes == 1:
            self.nats = NatsServer(find_free_port(), workdir / "nats",
                                   log_path=workdir / "nats.log")
        else:
            self.nats = NatsCluster(free_node_ports(num_nats_nodes), workdir / "nats",
                                    log_dir=workdir)
        self.replicas = num_nats_nodes
        self.daemons: dict[str, Daemon] = {}
        self.nats.start()

    @property
    def nats_url(self) -> str:
        return self.nats.url

    def config(self, role: str, worker_id: str, **overrides: object) -> WorkerConfig:
        return worker_config(role, worker_id, self.nats_url, replicas=self.replicas,
                             **overrides)

    def start(self, configs: Iterable[WorkerConfig]) -> list[Daemon]:
        started = []
        for config in configs:
            old = self.daemons.get(config.worker_id)
            if old is not None and old.alive:
                raise RuntimeError(f"{config.worker_id} is still running")
            started.append(start_daemon(config, self.workdir))
            self.daemons[config.worker_id] = started[-1]
        wait_ready(started)
        return started

    def restart(self, worker_id: str, config: WorkerConfig | None = None) -> Daemon:
        old = self.daemons[worker_id]
        if old.alive:
            old.signal(signal.SIGKILL)
        old.process.wait()
        return self.start([config or old.config])[0]

    def kill(self, worker_id: str) -> None:
        d = self.daemons[worker_id]
        d.signal(signal.SIGKILL)
        d.process.wait()

    def stop(self, worker_ids: Iterable[str]) -> None:
        stop_daemons([self.daemons.pop(w) for w in list(worker_ids)])

    def role(self, role: str) -> list[Daemon]:
        return [d for d in self.daemons.values() if d.config.role == role and d.alive]

    def close(self) -> None:
        stop_daemons(self.daemons.values())
        self.nats.stop()


# --- Admin (grpc.aio, the generated stub) -------------------------------------------------

async def get_status(address: str, timeout_s: float = 3.0) -> admin_pb2.GetStatusResponse | None:
    """GetStatus, or None when the worker does not answer (dead, frozen, restarting)."""
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            return await admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return None


async def reload_config(address: str) -> admin_pb2.ReloadResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_pb2_grpc.AdminStub(channel).Reload(admin_pb2.ReloadRequest(),
                                                               timeout=10.0)


async def get_config(address: str) -> admin_pb2.GetConfigResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await admin_pb2_grpc.AdminStub(channel).GetConfig(admin_pb2.GetConfigRequest(),
                                                                 timeout=10.0)


def write_config_text(path: Path, text: str) -> None:
    """Replace a config file by rename, as an editor or a deploy tool does."""
    tmp = path.with_name(f".{path.name}.chaos")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_with(config: WorkerConfig, dotted: str, value: object) -> str:
    """`config` as YAML with one (possibly invalid) value set at a dotted path."""
    data = yaml.safe_load(config_to_yaml(config))
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value
    return yaml.safe_dump(data, sort_keys=False)


def counters_of(status: admin_pb2.GetStatusResponse) -> dict[str, int]:
    return {name: int(getattr(status.counters, name)) for name in COUNTER_NAMES}


class CounterLedger:
    """Counter totals over one row, per role, across restarts.

    Counters are cumulative per process life (incarnation). The ledger keeps each
    life's first and last observation; a life first seen after the row started
    counts from zero. Call `observe` at the row's start, just before every kill, and
    at the end; a life's counts after its last observation are lost with it."""

    def __init__(self) -> None:
        self._first: dict[tuple[str, str], dict[str, int]] = {}
        self._last: dict[tuple[str, str], tuple[str, dict[str, int]]] = {}
        self._baseline_done = False

    async def observe(self, daemons: Iterable[Daemon]) -> None:
        statuses = await asyncio.gather(*(get_status(d.address) for d in daemons if d.alive))
        for s in statuses:
            if s is None:
                continue
            key = (s.worker_id, s.incarnation)
            counts = counters_of(s)
            if key not in self._first:
                self._first[key] = counts if not self._baseline_done else dict.fromkeys(
                    COUNTER_NAMES, 0)
            self._last[key] = (s.role, counts)
        self._baseline_done = True

    def totals(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, (role, last) in self._last.items():
            first = self._first[key]
            into = out.setdefault(role, dict.fromkeys(COUNTER_NAMES, 0))
            for name in COUNTER_NAMES:
                into[name] += last[name] - first[name]
        return {role: {k: v for k, v in c.items() if v} for role, c in sorted(out.items())}


async def _prefill_stream_info(nats_url: str) -> StreamInfo:
    nc = await nats.connect(servers=nats_url.split(","), connect_timeout=2,
                            max_reconnect_attempts=1)
    try:
        return await nc.jetstream(timeout=2.0).stream_info(STREAM_PREFILL)
    finally:
        await nc.close()


async def num_queued_jobs(nats_url: str) -> int:
    return int((await _prefill_stream_info(nats_url)).state.messages)


async def stream_leader(nats_url: str) -> str:
    """Server name of the prefill stream's Raft leader in a NATS cluster."""
    info = await _prefill_stream_info(nats_url)
    if info.cluster is None or not info.cluster.leader:
        raise RuntimeError(f"{STREAM_PREFILL} has no leader")
    return str(info.cluster.leader)
