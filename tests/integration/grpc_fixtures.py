"""A real decode worker over gRPC: SmolLM2 engine, LocalGenerationService, Admin, health.

Everything runs on the test's event loop, so tools the tests run against the
server (grpcurl, the CLI) must be started with asyncio subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.control.local_admin import LocalAdminBackend
from splitserve.control.server import GrpcServer, start_grpc_server
from splitserve.engine.async_engine import AsyncEngine
from splitserve.rpc import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from splitserve.worker.local import LocalGenerationService

BIN = Path(sys.executable).parent
GRPCURL = BIN / "grpcurl"
SPLITSERVE = BIN / "splitserve"
WORKER_ID = "test-decode-0"
CAPITAL_PROMPT = "What is the capital of France?"


@dataclass
class GrpcWorker:
    engine: AsyncEngine
    admin: LocalAdminBackend
    server: GrpcServer
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def generation(self) -> generation_pb2_grpc.GenerationStub:
        return generation_pb2_grpc.GenerationStub(self.channel)

    @property
    def admin_stub(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel)

    async def status(self) -> admin_pb2.GetStatusResponse:
        return await self.admin_stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)

    async def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return resp.status

    async def generate(self, request: generation_pb2.GenerateRequest,
                       timeout: float = 60) -> list[generation_pb2.GenerateChunk]:
        return [chunk async for chunk in self.generation.Generate(request, timeout=timeout)]


@pytest_asyncio.fixture
async def grpc_worker_factory(smollm_engine: Callable[..., Any]
                              ) -> AsyncIterator[Callable[..., Awaitable[GrpcWorker]]]:
    """`await start(**engine_overrides)` → a serving worker; all are stopped at teardown."""
    workers: list[GrpcWorker] = []

    async def start(**overrides: Any) -> GrpcWorker:
        engine = AsyncEngine(smollm_engine(**{"num_pages": 64, **overrides}))
        await engine.start()
        admin = LocalAdminBackend(engine, worker_id=WORKER_ID)
        server = await start_grpc_server("127.0.0.1:0", LocalGenerationService(engine), admin)
        admin.grpc_address = server.address
        # Large enough to send the oversized prompts of the validation tests.
        channel = grpc.aio.insecure_channel(server.address, options=[
            ("grpc.max_send_message_length", 16 << 20)])
        worker = GrpcWorker(engine, admin, server, channel)
        workers.append(worker)
        return worker

    yield start
    for worker in reversed(workers):
        await worker.channel.close()
        await worker.server.stop(0)
        await worker.engine.stop()


@pytest_asyncio.fixture
async def grpc_worker(grpc_worker_factory: Callable[..., Awaitable[GrpcWorker]]) -> GrpcWorker:
    return await grpc_worker_factory()


def greedy(text: str | None = CAPITAL_PROMPT, **fields: Any) -> generation_pb2.GenerateRequest:
    """A greedy chat request unless overridden; `text=None` leaves the prompt unset."""
    fields = {"chat": True, "temperature": 0.0, "max_tokens": 16, **fields}
    if text is not None:
        fields["text"] = text
    return generation_pb2.GenerateRequest(**fields)


async def run_tool(*args: str | Path, timeout: float = 60) -> tuple[int, str, str]:
    """Run a command without blocking the loop the server lives on."""
    proc = await asyncio.create_subprocess_exec(
        *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects grpcurl prints one after another for a streaming call."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while (pos := _skip_space(text, pos)) < len(text):
        obj, pos = decoder.raw_decode(text, pos)
        objects.append(obj)
    return objects


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)
