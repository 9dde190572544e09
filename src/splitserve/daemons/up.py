"""`splitserve up --config F`: a local cluster (nats-server + workers) on this machine.

With `nats_cluster_size: 3` the broker is a 3-node JetStream cluster instead (logs
`<state>/nats-n<i>.log`); the workers get all its URLs and keep 3 replicas.

Each worker is a subprocess running `splitserve decode|prefill --config` with a
config written under the state dir; logs go to `<state>/<worker_id>.log`.
Ctrl-C (or SIGTERM) stops the workers (they drain) and then the broker.
With `secure: true` (the default) every worker's gRPC port runs TLS and checks tokens:
`<state>/certs` gets a CA, a server certificate and a tokens file on first start
(certs.py; kept across restarts), and the banner's commands carry `--tls-ca` and
`--token-file` (`-cacert` and `-H authorization` for grpcurl).
When the cluster file changes (or on SIGHUP), the workers' files are derived again
from its `worker:` template and rewritten by rename; each worker's own watcher then
reloads what may change live. The cluster's layout (counts, ports, state dir)
needs a restart of `splitserve up`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.certs import DEFAULT_GRANTS, broker_auth, init_certs, write_tokens
from splitserve.config.daemon import (
    ClusterConfig,
    WorkerConfig,
    config_to_yaml,
    load_cluster_config,
)
from splitserve.config.reload import diff_fields
from splitserve.config.security import AuthConfig, NatsAuthConfig, TlsConfig
from splitserve.config.watch import ChangeDetector
from splitserve.daemons.up_planner import (
    PLANNER_USER,
    PlannerProcess,
    flippable,
    local_template,
    local_users,
    planner_config,
)
from splitserve.daemons.up_router import ROUTER_USER, RouterProcess, router_config
from splitserve.errors import SplitserveError
from splitserve.queue.broker import NatsServer
from splitserve.queue.cluster import NatsCluster, base_node_ports
from splitserve.queue.permissions import Role


class ClusterStartError(SplitserveError):
    pass


@dataclasses.dataclass
class WorkerProcess:
    config: WorkerConfig
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


def worker_configs(cluster: ClusterConfig, nats_url: str, certs_dir: Path | None = None,
                   nats_auth: dict[str, NatsAuthConfig] | None = None) -> list[WorkerConfig]:
    """Decode workers first (ports base, base+1, ...), then prefill workers; one
    replica of the queue per NATS node (`nats_url` lists them all, comma-separated).
    With `certs_dir`, TLS and tokens from there, unless the template sets its own;
    `nats_auth`: each worker's broker login, by worker id."""
    template = cluster.worker
    if certs_dir is not None and not (template.grpc_tls.enabled or template.auth.enabled):
        template = replace(template, grpc_tls=TlsConfig(
            str(certs_dir / "server.pem"), str(certs_dir / "server.key")),
            auth=AuthConfig(str(certs_dir / "tokens")))
    roles = ["decode"] * cluster.num_decode_workers + ["prefill"] * cluster.num_prefill_workers
    configs = []
    counts = {"decode": 0, "prefill": 0}
    num_cpus = os.cpu_count() or 1
    for i, role in enumerate(roles):
        index = counts[role]
        counts[role] += 1
        config = replace(template, role=role, worker_id=f"{role}-{index}",  # type: ignore[arg-type]
                         grpc_address=f"127.0.0.1:{cluster.base_grpc_port + i}",
                         nats_url=nats_url,
                         nats=replace(cluster.worker.nats, replicas=cluster.nats_cluster_size))
        if nats_auth and config.worker_id in nats_auth:
            config = replace(config, nats_auth=nats_auth[config.worker_id])
        if cluster.base_metrics_port:
            config = replace(config, metrics_address=f"127.0.0.1:{cluster.base_metrics_port + i}")
        if cluster.pin_cores:
            config = replace(config, cpu_affinity=(i % num_cpus,), cpu_threads=1)
        configs.append(config)
    return configs


def write_config(config: object, path: Path) -> bool:
    """Write `config` (a config dataclass) to `path` by rename (a watcher never reads half a file); False
    when the file already says the same."""
    text = config_to_yaml(config)
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


class LocalCluster:
    def __init__(self, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.state_dir = Path(cluster.state_dir).resolve()
        self.nats: NatsServer | NatsCluster
        if cluster.nats_cluster_size == 1:
            self.nats = NatsServer(cluster.nats_port, self.state_dir / "nats",
                                   log_path=self.state_dir / "nats.log")
        else:
            self.nats = NatsCluster(base_node_ports(cluster.nats_port, cluster.nats_cluster_size),
                                    self.state_dir / "nats", log_dir=self.state_dir)
        self.workers: list[WorkerProcess] = []
        self.certs_dir = self.state_dir / "certs" if cluster.secure else None
        self.nats_auth: dict[str, NatsAuthConfig] = {}  # broker logins by user name
        self.router: RouterProcess | None = None
        self.planner: PlannerProcess | None = None

    @property
    def ca_file(self) -> str:
        """The CA the workers' certificates chain to ("" when not secure)."""
        return str(self.certs_dir / "ca.pem") if self.certs_dir is not None else ""

    def start(self) -> None:
        self.prepare_security()
        self.nats.start()
        self.write_worker_configs()
        for worker in self.workers:
            with worker.log_path.open("ab") as log_file:
                worker.process = subprocess.Popen(
                    [sys.executable, "-m", "splitserve.cli", worker.config.role, "--config",
                     str(worker.config_path)],
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        if self.cluster.router:
            self.router = RouterProcess(
                router_config(self.cluster, self.nats.url, self.certs_dir,
                              self.nats_auth.get(ROUTER_USER, NatsAuthConfig())),
                self.state_dir / "router.yaml", self.state_dir / "router.log", self.certs_dir)
            write_config(self.router.config, self.router.config_path)
            self.router.start()
            self.router.wait_ready(self.cluster.num_decode_workers, self.cluster.ready_timeout_s)
        if self.cluster.planner:
            local = None
            if local_users(self.cluster):
                local = self.state_dir / "local-worker.yaml"
                write_config(local_template(self.workers[0].config, self.certs_dir,
                                            self.ca_file), local)
            self.planner = PlannerProcess(
                planner_config(self.cluster, self.nats.url, self.certs_dir,
                               self.nats_auth.get(PLANNER_USER, NatsAuthConfig()), local),
                self.state_dir / "planner.yaml", self.state_dir / "planner.log", self.certs_dir)
            write_config(self.planner.config, self.planner.config_path)
            self.planner.start()
            address = self.planner.config.grpc_address
            self.planner.wait_ready(self.cluster.ready_timeout_s,
                                    lambda: health_serving(address, ca_file=self.ca_file))

    @property
    def processes(self) -> list[tuple[str, subprocess.Popen[bytes] | None]]:
        """(name, process) of every daemon started here, the router and planner last."""
        named = [(w.config.worker_id, w.process) for w in self.workers]
        return (named + ([("router", self.router.process)] if self.router else [])
                + ([("planner", self.planner.process)] if self.planner else []))

    def write_worker_configs(self) -> None:
        """One config file per worker under the state dir (`workers`, not started yet)."""
        self.prepare_security()
        for config in worker_configs(self.cluster, self.nats.url, self.certs_dir,
                                     self.nats_auth):
            path = self.state_dir / f"{config.worker_id}.yaml"
            write_config(config, path)
            self.workers.append(
                WorkerProcess(config, path, self.state_dir / f"{config.worker_id}.log"))

    def refresh_worker_configs(self, cluster: ClusterConfig) -> tuple[list[str], list[Path]]:
        """Rewrite the workers' files from `cluster.worker`; the running layout stays.

        Returns the changed layout fields (they need a restart of `splitserve up`)
        and the files rewritten."""
        layout = [n for n in diff_fields(self.cluster, cluster) if not n.startswith("worker.")]
        self.cluster = replace(self.cluster, worker=cluster.worker)
        rewritten = []
        for worker, config in zip(self.workers, worker_configs(
                self.cluster, self.nats.url, self.certs_dir, self.nats_auth)):
            worker.config = config
            if write_config(config, worker.config_path):
                rewritten.append(worker.config_path)
        return layout, rewritten

    def prepare_security(self) -> None:
        """With `secure`: the certificates and tokens in `certs_dir` and, on a single
        broker, its TLS and one user per worker plus admin and planner, each with the
        permissions of queue/permissions.py (passwords in `<name>.nats-password`)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.certs_dir is None or self.nats_auth:
            return
        init_certs(self.certs_dir)
        write_tokens(self.certs_dir, DEFAULT_GRANTS)
        # workers the planner flips get an identity that may serve either role
        users: list[tuple[str, Role]] = [
            (c.worker_id, "worker" if flippable(self.cluster) else c.role)
            for c in worker_configs(self.cluster, self.nats.url)]
        if self.cluster.router:
            users.append((ROUTER_USER, "router"))
        users += local_users(self.cluster)
        auth = broker_auth(self.certs_dir, users)
        for name, path in auth.password_files.items():
            self.nats_auth[name] = NatsAuthConfig(name, str(path), self.ca_file)
        self.nats.config_text = auth.config_text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cluster.ready_timeout_s
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                assert worker.process is not None
                if worker.process.poll() is not None:
                    raise ClusterStartError(
                        f"{worker.config.worker_id} exited with {worker.process.returncode}; "
                        f"last lines of {worker.log_path}:\n{_tail(worker.log_path)}")
                if health_serving(worker.config.grpc_address, ca_file=self.ca_file):
                    pending.remove(worker)
            if pending and time.monotonic() > deadline:
                names = ", ".join(w.config.worker_id for w in pending)
                raise ClusterStartError(f"not ready after {self.cluster.ready_timeout_s:.0f} s: "
                                        f"{names} (logs in {self.state_dir})")
            time.sleep(0.3)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.planner is not None:  # first: no flip starts while the workers stop
            self.planner.stop(grace_s)
        if self.router is not None:  # then: no new requests reach draining workers
            self.router.stop(grace_s)
        for worker in self.workers:
            if worker.process and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()
        self.nats.stop()

    def _broker_login(self) -> str:
        admin = self.nats_auth.get("admin")
        if admin is None:
            return ""
        return (f" --nats-user admin --nats-password-file {admin.password_file} "
                f"--nats-ca {admin.ca_file}")

    def banner(self) -> str:
        decode = [w.config.grpc_address for w in self.workers if w.config.role == "decode"]
        lines = [f"splitserve cluster up (state in {self.state_dir})",
                 f"  nats       {self.nats.url}" + (
                     "  (TLS, a user per worker with least privilege: README, \"Trust\")"
                     if self.nats_auth else "")]
        lines += [f"  {w.config.worker_id:<10} {w.config.grpc_address}  (log {w.log_path})"
                  for w in self.workers]
        if self.router is not None:
            lines.append(f"  router     {self.router.base_url} (OpenAI API), gRPC "
                         f"{self.router.config.grpc_address}  (log {self.router.log_path})")
        if self.planner is not None:
            settings = self.planner.config
            lines.append(f"  planner    {settings.grpc_address}  (mode {settings.mode}, "
                         f"actuator {settings.actuator.kind}; log {self.planner.log_path})")
        with_metrics = [w for w in self.workers if w.config.metrics_address]
        metrics = [f"http://{w.config.metrics_address}/metrics" for w in with_metrics]
        lines += [f"  metrics    {url}  ({w.config.worker_id})"
                  for url, w in zip(metrics, with_metrics, strict=True)]
        if self.router is not None:
            lines.append(f"  metrics    {self.router.base_url.removesuffix('/v1')}/metrics  (router)")
        if self.planner is not None and self.planner.config.metrics_address:
            lines.append(f"  metrics    http://{self.planner.config.metrics_address}/metrics  "
                         "(planner)")
        target = decode[0]
        exe = Path(sys.executable).parent / "splitserve"
        grpcurl = Path(sys.executable).parent / "grpcurl"
        tls, admin, curl_tls, curl_admin = "", "", "-plaintext", ""
        if self.certs_dir is not None:
            token_file = self.certs_dir / "admin.token"
            lines.insert(2, f"  certs      {self.certs_dir}  (CA ca.pem, tokens file tokens; "
                            "TLS and tokens on every gRPC port)")
            tls, admin = f" --tls-ca {self.ca_file}", f" --token-file {token_file}"
            curl_tls = f"-cacert {self.ca_file}"
            curl_admin = f' -H "authorization: Bearer $(cat {token_file})"'
        body = ('{"text": "What is the capital of France?", "chat": true, "max_tokens": 16, '
                '"temperature": 0}')
        lines += [
            "",
            "Try:",
            (f"  {exe} generate --target {target}{tls} --chat --temperature 0 "
             "--prompt 'What is the capital of France?'"),
            f"  {exe} admin status --target {target}{tls}{admin}",
            f"  {grpcurl} {curl_tls} {target} list",
            f"  {grpcurl} {curl_tls} -d '{body}' {target} splitserve.v1.Generation/Generate",
            f"  {grpcurl} {curl_tls}{curl_admin} {target} splitserve.v1.Admin/GetStatus",
            f"  {exe} admin policy get --nats-url {self.nats.url}{self._broker_login()}",
            *([f"  curl -s {metrics[0]} | grep '^splitserve:time_to_first_token'"]
              if metrics else []),
            *(self.router.banner_lines() if self.router else []),
            *(self.planner.banner_lines(grpcurl) if self.planner else []),
            "",
            "Ctrl-C stops the cluster.",
        ]
        return "\n".join(lines)


def health_serving(address: str, timeout_s: float = 0.5, ca_file: str = "") -> bool:
    """Health of "" is SERVING; `ca_file`: over TLS, verifying the server with it."""
    try:
        channel = (grpc.secure_channel(address, grpc.ssl_channel_credentials(
            Path(ca_file).read_bytes())) if ca_file else grpc.insecure_channel(address))
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def _tail(path: Path, num_lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return "(no log)"


def run_up(cluster: ClusterConfig, changes: ChangeDetector | None = None) -> None:
    """Run the cluster until Ctrl-C/SIGTERM; with `changes` (the cluster file), refresh
    the workers' configs when it changes or on SIGHUP."""
    local = LocalCluster(cluster)
    stopping = False
    hangup = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    def on_hangup(signum: int, frame: object) -> None:
        nonlocal hangup
        hangup = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # a second Ctrl-C must not cut the shutdown short
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        local.start()
        print(local.banner(), flush=True)
        while all(p is not None and p.poll() is None for _, p in local.processes):
            time.sleep(0.5)
            if changes is not None and (changes.poll() or hangup):
                hangup = False
                _refresh(local, changes.path)
        died = [name for name, p in local.processes if p is not None and p.poll() is not None]
        print(f"exited: {', '.join(died)}; stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping the cluster...", file=sys.stderr)
    finally:
        local.stop()


def _refresh(local: LocalCluster, path: Path) -> None:
    try:
        cluster = load_cluster_config(path)
    except SplitserveError as exc:
        print(f"{path}: not reloaded, the workers keep their config: {exc}", file=sys.stderr)
        return
    layout, rewritten = local.refresh_worker_configs(cluster)
    if layout:
        print(f"{path}: {', '.join(layout)} changed; restart `splitserve up` to apply",
              file=sys.stderr)
    if rewritten:
        print(f"{path}: rewrote {', '.join(p.name for p in rewritten)}; the workers reload "
              "them", file=sys.stderr)
    else:
        print(f"{path}: no worker config changed", file=sys.stderr)
