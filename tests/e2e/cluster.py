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
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc

from splitserve.config.daemon import WorkerConfig
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
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
