"""A receiving worker in its own process, for the transfer tests.

The child builds a KV pool filled with a sentinel, starts a real `TransferAgent`,
sends its `WorkerDescriptor` (protobuf bytes) over a pipe and then waits for
notifications. At the moment it sees one it snapshots its whole pool and sends
the snapshot back, so the parent can check that the data had landed before the
notification was delivered.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import time
from dataclasses import dataclass

import torch

from splitserve.engine.kv_pool import KVPool, PageGeometry, dtype_from_name
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.transfer import TransferAgent

SENTINEL = -7.0
STARTUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PeerSpec:
    worker_id: str
    page_size: int = 4
    num_layers: int = 2
    num_kv_heads: int = 2
    head_dim: int = 8
    dtype: str = "float32"
    num_pages: int = 32
    model_fingerprint: str = "transfer-test-model"
    snapshot_on_notification: bool = True  # off for large pools

    @property
    def geometry(self) -> PageGeometry:
        return PageGeometry(
            self.page_size, self.num_layers, self.num_kv_heads, self.head_dim,
            dtype_from_name(self.dtype),
        )


@dataclass(frozen=True)
class Notification:
    peer_id: str
    message: bytes
    pool_at_notification: torch.Tensor | None  # the receiver's pool when it saw the message


def _serve(spec: PeerSpec, conn: mpc.Connection) -> None:
    """Child process entry point."""
    pool = KVPool(spec.geometry, spec.num_pages)
    pool.tensor.fill_(SENTINEL)
    agent = TransferAgent(spec.worker_id, pool, spec.model_fingerprint, role="decode")
    conn.send_bytes(agent.descriptor.SerializeToString())
    asyncio.run(_receive_loop(agent, pool, conn, spec.snapshot_on_notification))


async def _receive_loop(
    agent: TransferAgent, pool: KVPool, conn: mpc.Connection, snapshot: bool
) -> None:
    while True:
        for peer_id, message in await agent.wait_notifications(timeout_s=0.02):
            data = pool.tensor.view(torch.uint8).numpy().tobytes() if snapshot else b""
            conn.send(("notification", peer_id, message, data))
        if conn.poll() and conn.recv() == "stop":
            agent.close()
            conn.send(("stopped",))
            return


class PeerProcess:
    """Parent-side handle of a receiving worker process."""

    def __init__(self, spec: PeerSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(spec, child_conn), daemon=True)
        self._process.start()
        child_conn.close()
        if not self._conn.poll(STARTUP_TIMEOUT_S):
            self.kill()
            raise TimeoutError(f"peer {spec.worker_id} did not start in {STARTUP_TIMEOUT_S} s")
        self.descriptor = WorkerDescriptor.FromString(self._conn.recv_bytes())

    @property
    def pid(self) -> int:
        pid = self._process.pid
        assert pid is not None
        return pid

    def next_notification(self, timeout_s: float = 10.0) -> Notification:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"no notification from {self.spec.worker_id} in {timeout_s} s")
        kind, peer_id, message, snapshot = self._conn.recv()
        assert kind == "notification", kind
        if not snapshot:
            return Notification(peer_id, message, None)
        pool = torch.frombuffer(bytearray(snapshot), dtype=torch.uint8)
        shape = (self.spec.num_pages, *self.spec.geometry.page_shape)
        return Notification(peer_id, message, pool.view(self.spec.geometry.dtype).view(shape))

    def has_message(self, timeout_s: float) -> bool:
        return self._conn.poll(timeout_s)

    def kill(self) -> None:
        """`kill -9`, and reap the process so its memory is gone."""
        if self._process.is_alive():
            os.kill(self.pid, signal.SIGKILL)
        self._process.join(timeout=10)

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send("stop")
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and self._conn.poll(deadline - time.monotonic()):
                    if self._conn.recv()[0] == "stopped":
                        break
            except (BrokenPipeError, EOFError, OSError):
                pass
        self.kill()
