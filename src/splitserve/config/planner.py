"""Typed config of the planner daemon (`splitserve planner --config F`) and of its policy,
which `splitserve simulate` reads from the same file.

```yaml
grpc_address: 127.0.0.1:50070     # splitserve.v1.Planner, Admin, health, reflection
metrics_address: 127.0.0.1:9470   # Prometheus /metrics ("" : none)
nats_url: nats://127.0.0.1:4222
mode: advise                      # auto | advise | off (SetMode changes it live)
interval_s: 5                     # one plan per tick
stats_max_age_s: 15               # a worker with older stats is left out of the plan
settle_s: 10                      # no plan until the same workers were listed this long
actuator:
  kind: dry-run                   # dry-run | role | systemd | local
scaling:                          # coordinated P/D scaling (planner/policy.py)
  target_decode_tokens_per_s: 40  # per decode instance
  pd_ratio_min: 0.25
  pd_ratio_max: 2.0
thresholds:                       # live retuning of the routing thresholds
  enabled: true
```

Every number a default here; an invalid value is refused with its field named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splitserve.config.schema import (
    NatsConfig,
    check_address,
    check_range,
    from_mapping,
    load_yaml,
)
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.errors import ConfigError
from splitserve.routing.offload import RoutingConfig

MAX_INSTANCES = 4096


@dataclass(frozen=True)
class ScalingConfig:
    """Coordinated P/D scaling after HeteroScale: decode tokens/s per decode instance is
    the signal, held near `target_decode_tokens_per_s` by proportional control; SLO
    violations push decode up; prefill follows from its measured load, its P/D ratio
    kept in [pd_ratio_min, pd_ratio_max]."""

    enabled: bool = True
    target_decode_tokens_per_s: float = 40.0
    gain: float = 0.5  # fraction of the gap to the proportional target closed per change
    tolerance: float = 0.15  # |signal / target - 1| below this: no change (hysteresis)
    ttft_slo_ms: float = 2000.0  # p99 per worker window; above it: scale up, never down
    tpot_slo_ms: float = 200.0  # TPOT p99 (per finished request)
    # the share of a role's workers over an SLO that makes it a violation (one at least):
    # across many workers, some window's p99 is always over
    violation_fraction: float = 0.1
    prefill_target_utilization: float = 0.7  # of a prefill instance's measured rate
    backlog_drain_s: float = 10.0  # queued prompt tokens should clear within this
    pd_ratio_min: float = 0.0
    pd_ratio_max: float = 4.0
    min_decode: int = 1
    max_decode: int = 64
    # With no prefill worker nothing is offloaded, so no prefill load is ever measured and
    # the pool could not grow back from zero: keep one unless a config says 0.
    min_prefill: int = 1
    max_prefill: int = 64
    max_step: int = 2  # instances added or removed per role per change
    scale_up_cooldown_s: float = 30.0
    scale_down_cooldown_s: float = 120.0

    def __post_init__(self) -> None:
        check_range("scaling.target_decode_tokens_per_s", self.target_decode_tokens_per_s,
                    0.0, 1e7, low_open=True)
        check_range("scaling.gain", self.gain, 0.0, 1.0, low_open=True)
        check_range("scaling.tolerance", self.tolerance, 0.0, 1.0, high_open=True)
        check_range("scaling.ttft_slo_ms", self.ttft_slo_ms, 0.0, 3.6e6, low_open=True)
        check_range("scaling.tpot_slo_ms", self.tpot_slo_ms, 0.0, 3.6e6, low_open=True)
        check_range("scaling.violation_fraction", self.violation_fraction, 0.0, 1.0)
        check_range("scaling.prefill_target_utilization", self.prefill_target_utilization,
                    0.0, 1.0, low_open=True)
        check_range("scaling.backlog_drain_s", self.backlog_drain_s, 0.0, 3600.0,
                    low_open=True)
        check_range("scaling.pd_ratio_min", self.pd_ratio_min, 0.0, 1000.0)
        check_range("scaling.pd_ratio_max", self.pd_ratio_max, self.pd_ratio_min, 1000.0)
        check_range("scaling.min_decode", self.min_decode, 1, MAX_INSTANCES)
        check_range("scaling.max_decode", self.max_decode, self.min_decode, MAX_INSTANCES)
        check_range("scaling.min_prefill", self.min_prefill, 0, MAX_INSTANCES)
        check_range("scaling.max_prefill", self.max_prefill, self.min_prefill, MAX_INSTANCES)
        check_range("scaling.max_step", self.max_step, 1, MAX_INSTANCES)
        check_range("scaling.scale_up_cooldown_s", self.scale_up_cooldown_s, 0.0, 86400.0)
        check_range("scaling.scale_down_cooldown_s", self.scale_down_cooldown_s, 0.0, 86400.0)


@dataclass(frozen=True)
class ThresholdConfig:
    """Live retuning of the routing thresholds from measured rates: the break-even
    prompt length (local prefill on a decode worker vs the prefill pool's queue wait +
    prefill + KV transfer), moved at most `max_step_fraction` per change, not at all
    when the change is under `hysteresis_fraction`, at most once per `cooldown_s`."""

    enabled: bool = True
    min_prefill_length: int = 16
    max_prefill_length: int = 4096  # remote stays the path of the longest prompts
    moderate_fraction: float = 0.375  # moderate_length_threshold / prefill_length_threshold
    max_step_fraction: float = 0.5
    hysteresis_fraction: float = 0.1
    cooldown_s: float = 30.0
    overhead_ms: float = 20.0  # job publish + KVReady notification, besides queue wait
    min_samples_workers: int = 1  # workers of each pool with a measured rate

    def __post_init__(self) -> None:
        check_range("thresholds.min_prefill_length", self.min_prefill_length, 0, 1 << 24)
        check_range("thresholds.max_prefill_length", self.max_prefill_length,
                    self.min_prefill_length, 1 << 24)
        check_range("thresholds.moderate_fraction", self.moderate_fraction, 0.0, 1.0)
        check_range("thresholds.max_step_fraction", self.max_step_fraction, 0.0, 10.0,
                    low_open=True)
        check_range("thresholds.hysteresis_fraction", self.hysteresis_fraction, 0.0, 1.0)
        check_range("thresholds.cooldown_s", self.cooldown_s, 0.0, 86400.0)
        check_range("thresholds.overhead_ms", self.overhead_ms, 0.0, 60000.0)
        check_range("thresholds.min_samples_workers", self.min_samples_workers, 1, 1 << 16)


@dataclass(frozen=True)
class PolicyConfig:
    """What planner/policy.py decides by (pure: the simulator reads it too)."""

    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)


@dataclass(frozen=True)
class ActuatorConfig:
    """How a plan is carried out.

    - dry-run: log what would be done;
    - role: drain a worker and flip it between prefill and decode (Admin/SetRole); the
      total stays the workers present;
    - systemd: `systemctl start|stop` of `unit_prefill` / `unit_decode` with `{n}` the
      instance number;
    - local: start/stop worker processes on this machine from the worker config
      `local_worker_config` (planner/local.py; `splitserve up` sets it up).
    Failures are retried with exponential backoff from `retry_initial_s` to
    `retry_max_s`; the planner never dies of one."""

    kind: Literal["dry-run", "role", "systemd", "local"] = "dry-run"
    drain_grace_s: float = 30.0  # role: in-flight work finishes before a flip
    call_timeout_s: float = 60.0  # one actuation (SetRole, systemctl) at most
    systemctl: str = "systemctl"
    systemctl_user: bool = False  # systemctl --user
    unit_prefill: str = "splitserve-prefill@{n}.service"
    unit_decode: str = "splitserve-decode@{n}.service"
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    # role: how the planner reaches the workers' Admin (their CA and an admin token)
    ca_file: str = ""
    token_file: str = ""
    # local: the worker config every started worker is written from, where files and
    # logs go ("": the template's folder), and how many the planner may start at most
    local_worker_config: str = ""
    local_state_dir: str = ""
    local_max_workers: int = 8

    def __post_init__(self) -> None:
        check_range("actuator.drain_grace_s", self.drain_grace_s, 0.0, 3600.0)
        check_range("actuator.call_timeout_s", self.call_timeout_s, 0.0, 3600.0, low_open=True)
        check_range("actuator.retry_initial_s", self.retry_initial_s, 0.0, 3600.0,
                    low_open=True)
        check_range("actuator.retry_max_s", self.retry_max_s, self.retry_initial_s, 86400.0)
        check_range("actuator.local_max_workers", self.local_max_workers, 1, 1024)
        for name in ("unit_prefill", "unit_decode"):
            if "{n}" not in getattr(self, name):
                raise ConfigError(f"actuator.{name}", "must contain {n} (the instance number)")


@dataclass(frozen=True)
class PlannerConfig:
    grpc_address: str = "127.0.0.1:50070"
    metrics_address: str = ""  # host:port of /metrics (Prometheus); "" : none
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: NatsAuthConfig = field(default_factory=NatsAuthConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    grpc_tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    planner_id: str = ""  # "" : planner-<hostname>
    mode: Literal["auto", "advise", "off"] = "advise"
    interval_s: float = 5.0
    stats_max_age_s: float = 15.0
    # No plan until the registry has listed the same workers for this long: at start-up
    # and when a worker joins or leaves (a plan from a cluster still forming moves the
    # wrong workers, e.g. the only prefill worker to decode before the decode ones list).
    settle_s: float = 10.0
    lock_ttl_s: float = 15.0  # the leader's lock in splitserve-policy; a standby takes over
    history_size: int = 256  # plans and audit records kept for History
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    actuator: ActuatorConfig = field(default_factory=ActuatorConfig)
    # The workers' `routing:` as their config files set it: the thresholds in force are
    # these with the `routing` key of splitserve-policy over them.
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        check_address("grpc_address", self.grpc_address)
        if self.metrics_address:
            check_address("metrics_address", self.metrics_address)
        check_range("interval_s", self.interval_s, 0.0, 3600.0, low_open=True)
        check_range("stats_max_age_s", self.stats_max_age_s, 0.0, 86400.0, low_open=True)
        check_range("settle_s", self.settle_s, 0.0, 3600.0)
        check_range("lock_ttl_s", self.lock_ttl_s, 1.0, 3600.0)
        check_range("history_size", self.history_size, 1, 1 << 16)

    @property
    def policy(self) -> PolicyConfig:
        return PolicyConfig(self.scaling, self.thresholds)


def load_planner_config(path: str | Path) -> PlannerConfig:
    """The planner config at `path`; ConfigError naming the field when invalid."""
    return from_mapping(PlannerConfig, load_yaml(path))
