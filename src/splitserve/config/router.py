"""Typed config of the router daemon (`splitserve router --config F`), loaded from YAML.

```yaml
http_address: 127.0.0.1:8000      # OpenAI-compatible HTTP API
grpc_address: 127.0.0.1:50050     # splitserve.v1.Generation, forwarded ("" : none)
nats_url: nats://127.0.0.1:4222   # the registry (which decode workers exist), their stats
nats_auth: {user: router, password_file: ..., ca_file: ...}
model: ""                         # the tokenizer's source; "" : the embedded SmolLM2
served_model_name: ""             # the name in /v1/models; "" : the model file's stem
workers:                          # how the router reaches the decode workers
  ca_file: /etc/splitserve/certs/ca.pem
  token_file: /etc/splitserve/certs/client.token   # a token with scope "generate"
auth:                             # API keys for the router's own HTTP and gRPC
  tokens_file: /etc/splitserve/certs/tokens
  require_generate: true
grpc_tls: {cert_file: ..., key_file: ...}           # also serves HTTPS when set
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splitserve.config.schema import (
    TPOT_SLO_S,
    TTFT_SLO_S,
    NatsConfig,
    PerClass,
    check_address,
    check_range,
    from_mapping,
    load_yaml,
)
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.errors import ConfigError


@dataclass(frozen=True)
class WorkerClientConfig:
    """The router as a client of the decode workers' gRPC: their CA (TLS), a client
    certificate (mTLS) and a token with scope `generate` (when they require one)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("workers", "cert_file and key_file go together")


@dataclass(frozen=True)
class CostWeights:
    """How much each signal costs a worker (lower total wins); the prefix terms are
    bonuses, subtracted."""

    kv_occupancy: float = 3.0  # × the fraction of KV pages in use
    active: float = 1.0  # × requests open on it (the router's count, or its queue)
    cached_prefix: float = 10.0  # × the fraction of the prompt's pages it has cached
    recent_prefix: float = 1.0  # × the fraction this router sent it lately


@dataclass(frozen=True)
class QosConfig:
    """`qos:` of the router's config."""

    admission: bool = True
    # estimated TTFT above which a class is refused (0: never refused): by default its
    # SLO, so a request that would likely meet it is never turned away (ARCHITECTURE.md)
    reject_above_s: PerClass = PerClass(normal=TTFT_SLO_S.normal, low=TTFT_SLO_S.low)
    # what each class is promised: the router counts each completed request as met or
    # not (router/slo.py, splitserve:router_slo_requests_total); benchmarks count
    # goodput against these
    ttft_slo_s: PerClass = TTFT_SLO_S
    tpot_slo_s: PerClass = TPOT_SLO_S
    # graceful degradation: above this estimated TTFT a class's max_tokens is capped at
    # degraded_max_tokens (0: never); the HTTP response says so in x-splitserve-degraded
    degrade_above_s: PerClass = PerClass(low=1.0)
    degraded_max_tokens: int = 64
    # hedging: a high-priority request whose estimate on the chosen worker exceeds its
    # TTFT SLO also goes to an idle worker; the first to answer wins, the other is
    # cancelled. At most max_hedges such races at once.
    hedge: bool = False
    max_hedges: int = 4
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.degraded_max_tokens <= 1 << 20:
            raise ConfigError("qos.degraded_max_tokens", f"must be in [1, {1 << 20}], got "
                              f"{self.degraded_max_tokens}")
        if not 0 <= self.max_hedges <= 1024:
            raise ConfigError("qos.max_hedges", f"must be in [0, 1024], got {self.max_hedges}")
        if not 1 <= self.max_in_flight <= 1 << 20:
            raise ConfigError("qos.max_in_flight", f"must be in [1, {1 << 20}], got "
                              f"{self.max_in_flight}")


@dataclass(frozen=True)
class RouterConfig:
    http_address: str = "127.0.0.1:8000"
    grpc_address: str = "127.0.0.1:50050"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_auth: NatsAuthConfig = field(default_factory=NatsAuthConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    model: str = ""
    served_model_name: str = ""
    workers: WorkerClientConfig = field(default_factory=WorkerClientConfig)
    grpc_tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # A request body above this is refused (413) before it is parsed.
    max_body_bytes: int = 8 << 20
    # One request's whole generation, end to end (DEADLINE_EXCEEDED / 504 past it).
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    # kv_aware: load and cached prefix; least_loaded: load alone; round_robin: in turn
    balance: Literal["kv_aware", "least_loaded", "round_robin"] = "kv_aware"
    weights: CostWeights = field(default_factory=CostWeights)  # of kv_aware's cost
    qos: QosConfig = field(default_factory=QosConfig)  # admission control (router/admission.py)
    # A worker whose stats are older than this is scored by the router's own counts.
    stats_max_age_s: float = 5.0
    # After UNAVAILABLE from a worker (draining, gone) it gets no traffic for this long
    # unless its health says SERVING again.
    unavailable_backoff_s: float = 5.0
    # HTTP/2 keepalive pings to each worker every keepalive_s (0: off); a worker that
    # does not answer one within keepalive_timeout_s (frozen, its host gone) loses its
    # connection: no traffic, and calls waiting for its first token go to another one.
    keepalive_s: float = 10.0
    keepalive_timeout_s: float = 5.0
    drain_grace_s: float = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def __post_init__(self) -> None:
        check_address("http_address", self.http_address)
        if self.grpc_address:
            check_address("grpc_address", self.grpc_address)
        check_range("max_body_bytes", self.max_body_bytes, 1024, 1 << 30)
        check_range("request_timeout_s", self.request_timeout_s, 0.0, 86400.0, low_open=True)
        check_range("connect_timeout_s", self.connect_timeout_s, 0.0, 600.0, low_open=True)
        check_range("stats_max_age_s", self.stats_max_age_s, 0.0, 3600.0, low_open=True)
        check_range("unavailable_backoff_s", self.unavailable_backoff_s, 0.0, 600.0)
        if self.keepalive_s != 0.0:  # 0: off; workers accept a ping a second at most
            check_range("keepalive_s", self.keepalive_s, 1.0, 3600.0)
        check_range("keepalive_timeout_s", self.keepalive_timeout_s, 0.0, 600.0,
                    low_open=True)
        check_range("drain_grace_s", self.drain_grace_s, 0.0, 60.0)

    def policy(self) -> RouterPolicy:
        """What the `router` key of splitserve-policy may override live."""
        return RouterPolicy(self.weights, self.qos)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return Path(self.model).stem if Path(self.model).suffix else Path(self.model).name
        return ""  # resolved by the daemon from the embedded model's file


def load_router_config(path: str | Path) -> RouterConfig:
    return from_mapping(RouterConfig, load_yaml(path))


@dataclass(frozen=True)
class RouterPolicy:
    """A router's live knobs: the file's `weights:` and `qos:`, overridden field by field
    from the `router` key of splitserve-policy (routing/policy.py)."""

    weights: CostWeights = field(default_factory=CostWeights)
    qos: QosConfig = field(default_factory=QosConfig)
