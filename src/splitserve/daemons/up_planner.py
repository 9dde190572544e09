"""The planner of `splitserve up`: its config, process, readiness and banner lines.

With `planner: true` `up` starts `splitserve planner` once the workers (and the router)
are ready, configured by `planner_settings:` (config/planner.py; e.g. `mode`,
`actuator.kind: role`), on `planner_grpc_port`, with the workers' `routing:` as the
thresholds' base. With `secure`, its gRPC port runs TLS with the cluster's certificate
and checks tokens, it logs in to the broker as the user `planner` and reaches the
workers' Admin (role flips) with the CA and the admin token. With the `role` actuator
the workers get broker identities that may serve either role (queue/permissions.py);
with the `local` actuator `up` writes the template the planner starts workers from
(`<state>/local-worker.yaml`) and makes broker users `local-0`... for them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.config.daemon import ClusterConfig, WorkerConfig
from splitserve.config.planner import PlannerConfig
from splitserve.config.schema import NatsConfig
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.daemons.children import start_daemon, stop_daemon, wait_until
from splitserve.daemons.planner import LOCAL_STOP_S
from splitserve.planner.local import ID_PREFIX
from splitserve.queue.permissions import Role

PLANNER_USER = "planner"


def planner_config(cluster: ClusterConfig, nats_url: str, certs_dir: Path | None,
                   nats_auth: NatsAuthConfig, local_config: Path | None = None) -> PlannerConfig:
    """`local_config`: the `local` actuator's worker template (written by `up`)."""
    template = cluster.planner_settings
    if local_config is not None:
        template = replace(template, actuator=replace(
            template.actuator, local_worker_config=str(local_config),
            local_state_dir=str(local_config.parent)))
    metrics = f"127.0.0.1:{cluster.planner_metrics_port}" if cluster.planner_metrics_port else ""
    config = replace(template, grpc_address=f"127.0.0.1:{cluster.planner_grpc_port}",
                     metrics_address=metrics,
                     nats_url=nats_url, nats_auth=nats_auth,
                     nats=NatsConfig(replicas=cluster.nats_cluster_size),
                     planner_id=template.planner_id or "planner-up",
                     routing=cluster.worker.routing)
    if certs_dir is None:
        return config
    return replace(
        config, grpc_tls=TlsConfig(str(certs_dir / "server.pem"), str(certs_dir / "server.key")),
        auth=AuthConfig(str(certs_dir / "tokens")),
        actuator=replace(config.actuator, ca_file=str(certs_dir / "ca.pem"),
                         token_file=str(certs_dir / "admin.token")))


def flippable(cluster: ClusterConfig) -> bool:
    """Whether the planner of this cluster flips workers' roles."""
    return cluster.planner and cluster.planner_settings.actuator.kind == "role"


def local_users(cluster: ClusterConfig) -> list[tuple[str, Role]]:
    """Broker users for the workers a `local` planner may start (either role)."""
    actuator = cluster.planner_settings.actuator
    if not (cluster.planner and actuator.kind == "local"):
        return []
    return [(f"{ID_PREFIX}{k}", "worker") for k in range(actuator.local_max_workers)]


def local_template(worker: WorkerConfig, certs_dir: Path | None, ca_file: str) -> WorkerConfig:
    """The config a `local` planner starts workers from: a worker of this cluster's
    (broker, TLS, tokens, engine), logging in as itself (`{worker_id}`)."""
    nats_auth = (NatsAuthConfig("{worker_id}", str(certs_dir / "{worker_id}.nats-password"),
                                ca_file) if certs_dir is not None else NatsAuthConfig())
    return replace(worker, worker_id="", grpc_address="127.0.0.1:0", metrics_address="",
                   cpu_affinity=(), nats_auth=nats_auth)


@dataclass
class PlannerProcess:
    config: PlannerConfig
    config_path: Path
    log_path: Path
    certs_dir: Path | None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_daemon("planner", self.config_path, self.log_path)

    def wait_ready(self, timeout_s: float, serving: Callable[[], bool]) -> None:
        """Until `serving()` (its health says SERVING: the gRPC port listens)."""
        wait_until("planner", self.process, serving, timeout_s, self.log_path)

    def banner_lines(self, grpcurl: Path) -> list[str]:
        address = self.config.grpc_address
        flags = "-plaintext"
        if self.certs_dir is not None:
            token = self.certs_dir / "admin.token"
            flags = (f'-cacert {self.certs_dir / "ca.pem"} '
                     f'-H "authorization: Bearer $(cat {token})"')
        mode = json.dumps({"mode": "PLANNER_MODE_ADVISE"})
        return [f"  {grpcurl} {flags} {address} splitserve.v1.Planner/GetPlan",
                f"  {grpcurl} {flags} -d '{mode}' {address} splitserve.v1.Planner/SetMode"]

    def stop(self, timeout_s: float) -> None:
        """The planner stops the workers its `local` actuator started first (they drain)."""
        local = self.config.actuator.kind == "local"
        stop_daemon(self.process, timeout_s + (LOCAL_STOP_S if local else 0.0))
