"""Typed configs of the daemons and of `splitserve up`, loaded from YAML."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from splitserve.config.planner import PlannerConfig
from splitserve.config.router import RouterConfig
from splitserve.config.schema import (
    EngineConfig,
    NatsConfig,
    check_address,
    check_range,
    from_mapping,
    load_yaml,
)
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.errors import ConfigError
from splitserve.routing.offload import RoutingConfig


@dataclass(frozen=True)
class LeaseConfig:
    """Remote-prefill leases (the fence invariant).

    A job's lease is sized from the measured prefill rate (routing/lease.py):
    `base_s + queue wait + safety_factor · tokens / rate`, with `per_token_ms` per
    token until a rate is measured, at most `max_s`. A prefill worker that needs
    longer asks the decode worker for an extension, granted up to attempt start +
    `max_s`. A decode worker reuses landing pages only after the deadline in force +
    skew_margin_s; a prefill worker posts no transfer after its latest granted
    deadline − skew_margin_s.
    """

    base_s: float = 5.0
    per_token_ms: float = 5.0
    skew_margin_s: float = 0.5
    safety_factor: float = 2.0  # measured prefill time × this, for the initial lease
    max_s: float = 600.0  # an attempt's lease, renewals included, never exceeds this

    @property
    def cap_s(self) -> float:
        """The longest lease of one attempt, renewals included (never below base_s)."""
        return max(self.max_s, self.base_s)

    def __post_init__(self) -> None:
        # A lease beyond an hour would keep landing pages fenced off for that long
        # after a lost job; a skew margin of a minute means the clocks are broken.
        check_range("lease.base_s", self.base_s, 0.0, 3600.0, low_open=True)
        check_range("lease.per_token_ms", self.per_token_ms, 0.0, 1000.0)
        check_range("lease.skew_margin_s", self.skew_margin_s, 0.0, 60.0, high_open=True)
        check_range("lease.safety_factor", self.safety_factor, 1.0, 100.0)
        check_range("lease.max_s", self.max_s, 0.0, 3600.0, low_open=True)
        if self.skew_margin_s >= self.base_s:
            # a prefill worker would find every short job's lease already spent
            raise ConfigError("lease.skew_margin_s", f"must be below base_s ({self.base_s!r}), "
                              f"got {self.skew_margin_s!r}")


@dataclass(frozen=True)
class PrefillRoleConfig:
    max_batch_jobs: int = 8
    batch_window_ms: float = 5.0  # wait this long for more jobs once one arrived
    nak_delay_s: float = 0.5  # retryable failure: redeliver after this
    transfer_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        check_range("prefill.max_batch_jobs", self.max_batch_jobs, 1, 1024)
        check_range("prefill.batch_window_ms", self.batch_window_ms, 0.0, 10_000.0)
        check_range("prefill.nak_delay_s", self.nak_delay_s, 0.0, 600.0)
        # 0 would fail every job's transfer at once (a retry storm, no progress).
        check_range("prefill.transfer_timeout_s", self.transfer_timeout_s, 0.0, 600.0,
                    low_open=True)


@dataclass(frozen=True)
class FaultConfig:
    """Test-only fault injection (the chaos suite); every default injects nothing.

    - clock_offset_s: added to this worker's unix clock wherever leases and KVReady
      timestamps read it, to simulate clock skew between machines.
    - fail_transfer_every: the prefill worker fails every N-th page write at the
      transfer layer (0: never).
    - corrupt_page_every: the prefill worker flips a byte of the partial last page
      of every N-th write after computing its checksum (0: never).
    - crash_engine_after_steps: the engine thread dies in step N+1 (0: never), to test
      that the worker fails loudly (NOT_SERVING, deregistered, exit status 1).
    - prefill_hold_s: the prefill worker holds every job this long (in flight, lease
      kept) before computing it, like a busy prefill machine, so that a fault can
      strike while jobs are in flight however fast the engine is (0: no hold).
    - ack_delay_s: the prefill worker waits this long after a job's transfer before
      acking it, as an ack retried through a broker's leader election does (0: none).
    """

    clock_offset_s: float = 0.0
    fail_transfer_every: int = 0
    corrupt_page_every: int = 0
    crash_engine_after_steps: int = 0
    prefill_hold_s: float = 0.0
    ack_delay_s: float = 0.0

    def __post_init__(self) -> None:
        check_range("faults.prefill_hold_s", self.prefill_hold_s, 0.0, 60.0)
        check_range("faults.ack_delay_s", self.ack_delay_s, 0.0, 60.0)
        if min(self.fail_transfer_every, self.corrupt_page_every,
               self.crash_engine_after_steps) < 0:
            raise ConfigError("faults", "fail_transfer_every, corrupt_page_every and "
                              "crash_engine_after_steps must be >= 0")


# The WorkerConfig fields (top-level names; every field below them) that a running worker
# applies on reload: SIGHUP, a change of its config file, or Admin.Reload. The rest (role,
# identity, addresses, engine, CPU placement) are fixed at start-up and need a restart.
# Readers must take these from `core.config` at use time, never cache them.
RELOADABLE_WORKER_FIELDS: frozenset[str] = frozenset({
    "routing", "lease", "prefill", "log_level", "drain_grace_s", "stats_interval_s",
})


# The longest drain a worker grants in-flight work on SIGTERM. The systemd units
# (systemd/splitserve-*@.service) stop the worker with TimeoutStopSec=90: this bound plus
# 30 s for what follows the drain (gRPC stop, deregistration, engine and NIXL shutdown),
# so a drain always ends before systemd's SIGKILL. Raise both together.
MAX_DRAIN_GRACE_S = 60.0


@dataclass(frozen=True)
class WorkerConfig:
    """One worker daemon (`splitserve decode|prefill --config F`).

    Fields in `RELOADABLE_WORKER_FIELDS` change while the daemon runs (config/reload.py).
    """

    role: Literal["decode", "prefill"] = "decode"
    worker_id: str = ""  # "" → <role>-<hostname>-<pid>
    grpc_address: str = "127.0.0.1:50051"
    # Prometheus `/metrics` (host:port, port 0: any free one); "" serves no metrics.
    metrics_address: str = ""
    nats_url: str = "nats://127.0.0.1:4222"
    engine: EngineConfig = field(default_factory=EngineConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    prefill: PrefillRoleConfig = field(default_factory=PrefillRoleConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    grpc_tls: TlsConfig = field(default_factory=TlsConfig)  # config/security.py
    auth: AuthConfig = field(default_factory=AuthConfig)
    nats_auth: NatsAuthConfig = field(default_factory=NatsAuthConfig)
    # Prefill workers send an xxh3-64 checksum per written page; decode workers verify
    # it before use (a mismatch fails the attempt). Set on the decode worker: its jobs ask.
    kv_checksum: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    cpu_threads: int | None = None
    cpu_affinity: tuple[int, ...] | None = None
    drain_grace_s: float = 30.0
    stats_interval_s: float = 1.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        # Bounded so that the drain ends within the units' TimeoutStopSec (see above).
        check_range("drain_grace_s", self.drain_grace_s, 0.0, MAX_DRAIN_GRACE_S)
        check_range("stats_interval_s", self.stats_interval_s, 0.0, 3600.0, low_open=True)
        if self.metrics_address:
            check_address("metrics_address", self.metrics_address)

    def resolved_worker_id(self) -> str:
        if self.worker_id:
            return self.worker_id
        host = socket.gethostname().split(".")[0].replace("_", "-")
        return f"{self.role}-{host}-{os.getpid()}"


@dataclass(frozen=True)
class ClusterConfig:
    """`splitserve up`: a NATS server (or a NATS cluster) and workers on this machine.

    - nats_cluster_size: 1 runs one nats-server on nats_port; 3 runs a JetStream
      cluster with clients on nats_port..+2, routes on nats_port+2000.., monitoring
      on nats_port+4000.., and gives the workers every URL and `nats.replicas: 3`
      (any one node may die).
    """

    state_dir: str = "state"
    nats_port: int = 4222
    nats_cluster_size: int = 1
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    base_grpc_port: int = 50051  # decode workers first, then prefill workers
    base_metrics_port: int = 9400  # worker i serves /metrics on base+i; 0: no metrics
    # `splitserve router` in front of the decode workers: OpenAI HTTP API and gRPC
    router: bool = True
    router_http_port: int = 8000
    router_grpc_port: int = 50050
    # template for the router (config/router.py); up sets its addresses, broker and security
    router_settings: RouterConfig = field(default_factory=RouterConfig)
    # `splitserve planner` watching the workers (daemons/up_planner.py); its gRPC port
    # serves splitserve.v1.Planner. Off unless set: the benchmarks' clusters run without.
    planner: bool = False
    planner_grpc_port: int = 50070
    planner_metrics_port: int = 9470  # the planner's /metrics; 0: none
    # template for the planner (config/planner.py); up sets its address, broker, security
    # and the workers' routing
    planner_settings: PlannerConfig = field(default_factory=PlannerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)  # template for every worker
    pin_cores: bool = False  # worker i on core i mod cpu_count, one torch thread each
    ready_timeout_s: float = 180.0
    # TLS and tokens on every worker's gRPC port, from <state_dir>/certs (made on first
    # start by `certs init`); a template that sets grpc_tls or auth itself keeps them.
    secure: bool = True

    def __post_init__(self) -> None:
        if self.num_decode_workers < 1:
            raise ConfigError("num_decode_workers", "at least one decode worker is needed")
        if self.num_prefill_workers < 0:
            raise ConfigError("num_prefill_workers", "must be >= 0")
        for name in ("router_http_port", "router_grpc_port", "planner_grpc_port",
                     "planner_metrics_port"):
            check_range(name, getattr(self, name), 0, 65535)
        if self.nats_cluster_size not in (1, 3):
            raise ConfigError("nats_cluster_size", f"must be 1 or 3, got {self.nats_cluster_size!r}")
        if self.nats_cluster_size > 1 and self.nats_port + 4000 + self.nats_cluster_size > 65536:
            raise ConfigError("nats_port", f"{self.nats_port} leaves no room for the cluster's "
                              "route and monitoring ports (+2000, +4000)")


def load_worker_config(path: str | Path, role: str | None = None) -> WorkerConfig:
    data = load_yaml(path)
    config = from_mapping(WorkerConfig, data)
    if role is not None and data.get("role", role) != role:
        raise ConfigError("role", f"config says {data['role']!r} but this is the {role} daemon")
    return replace(config, role=role) if role else config  # type: ignore[arg-type]


def load_cluster_config(path: str | Path) -> ClusterConfig:
    return from_mapping(ClusterConfig, load_yaml(path))


def config_to_yaml(config: object) -> str:
    """YAML that the loaders read back to an equal config (a dataclass, or a mapping of them)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config  # type: ignore[arg-type]
    return yaml.safe_dump(_plain(data), sort_keys=False)


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def config_hash(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return ""
