"""`splitserve up --config F`: a local cluster (nats-server + workers) on this machine.

Each worker is a subprocess running `splitserve decode|prefill --config` with a
config written under the state dir; logs go to `<state>/<worker_id>.log`.
Ctrl-C (or SIGTERM) stops the workers (they drain) and then the broker.
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
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.config.daemon import ClusterConfig, WorkerConfig
from splitserve.errors import SplitserveError
from splitserve.queue.broker import NatsServer


class ClusterStartError(SplitserveError):
    pass


@dataclasses.dataclass
class WorkerProcess:
    config: WorkerConfig
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None


def worker_configs(cluster: ClusterConfig, nats_url: str) -> list[WorkerConfig]:
    """Decode workers first (ports base, base+1, ...), then prefill workers."""
    roles = ["decode"] * cluster.num_decode_workers + ["prefill"] * cluster.num_prefill_workers
    configs = []
    counts = {"decode": 0, "prefill": 0}
    num_cpus = os.cpu_count() or 1
    for i, role in enumerate(roles):
        index = counts[role]
        counts[role] += 1
        config = replace(cluster.worker, role=role, worker_id=f"{role}-{index}",  # type: ignore[arg-type]
                         grpc_address=f"127.0.0.1:{cluster.base_grpc_port + i}",
                         nats_url=nats_url)
        if cluster.pin_cores:
            config = replace(config, cpu_affinity=(i % num_cpus,), cpu_threads=1)
        configs.append(config)
    return configs


def write_config(config: WorkerConfig, path: Path) -> None:
    data = dataclasses.asdict(config)
    path.write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class LocalCluster:
    def __init__(self, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.state_dir = Path(cluster.state_dir).resolve()
        self.nats = NatsServer(cluster.nats_port, self.state_dir / "nats",
                               log_path=self.state_dir / "nats.log")
        self.workers: list[WorkerProcess] = []

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.nats.start()
        for config in worker_configs(self.cluster, self.nats.url):
            path = self.state_dir / f"{config.worker_id}.yaml"
            write_config(config, path)
            worker = WorkerProcess(config, path, self.state_dir / f"{config.worker_id}.log")
            with worker.log_path.open("ab") as log_file:
                worker.process = subprocess.Popen(
                    [sys.executable, "-m", "splitserve.cli", config.role, "--config", str(path)],
                    stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
            self.workers.append(worker)
        self.wait_ready()

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
                if health_serving(worker.config.grpc_address):
                    pending.remove(worker)
            if pending and time.monotonic() > deadline:
                names = ", ".join(w.config.worker_id for w in pending)
                raise ClusterStartError(f"not ready after {self.cluster.ready_timeout_s:.0f} s: "
                                        f"{names} (logs in {self.state_dir})")
            time.sleep(0.3)

    def stop(self, grace_s: float = 30.0) -> None:
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

    def banner(self) -> str:
        decode = [w.config.grpc_address for w in self.workers if w.config.role == "decode"]
        lines = [f"splitserve cluster up (state in {self.state_dir})",
                 f"  nats       {self.nats.url}"]
        lines += [f"  {w.config.worker_id:<10} {w.config.grpc_address}  (log {w.log_path})"
                  for w in self.workers]
        target = decode[0]
        exe = Path(sys.executable).parent / "splitserve"
        lines += [
            "",
            "Try:",
            (f"  {exe} generate --target {target} --chat --temperature 0 "
             "--prompt 'What is the capital of France?'"),
            f"  {exe} admin status --target {target}",
            f"  grpcurl -plaintext {target} list",
            (f"  grpcurl -plaintext -d '{{\"text\": \"What is the capital of France?\", "
             f"\"chat\": true, \"max_tokens\": 16, \"temperature\": 0}}' {target} "
             "splitserve.v1.Generation/Generate"),
            "",
            "Ctrl-C stops the cluster.",
        ]
        return "\n".join(lines)


def health_serving(address: str, timeout_s: float = 0.5) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
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


def run_up(cluster: ClusterConfig) -> None:
    local = LocalCluster(cluster)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # a second Ctrl-C must not cut the shutdown short
    try:
        local.start()
        print(local.banner(), flush=True)
        while all(w.process is not None and w.process.poll() is None for w in local.workers):
            time.sleep(0.5)
        died = [w.config.worker_id for w in local.workers
                if w.process is not None and w.process.poll() is not None]
        print(f"worker(s) exited: {', '.join(died)}; stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping the cluster...", file=sys.stderr)
    finally:
        local.stop()
