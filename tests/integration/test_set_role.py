"""Admin.SetRole on a real worker core in this process: SmolLM2 engine, NIXL agent, a real
nats-server (registry, stats), the real gRPC server. Unknown roles, the role in force,
a switch and back, two switches at once, and a grace that runs out; a worker that
turns busy says so at once (what a planner choosing whom to flip reads)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_fixtures import greedy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.config.daemon import WorkerConfig
from splitserve.config.schema import EngineConfig
from splitserve.control.server import GrpcServer, start_grpc_server
from splitserve.engine.sampling import SamplingParams
from splitserve.queue.broker import NatsServer
from splitserve.queue.registry import WorkerRegistry, parse_descriptor
from splitserve.queue.stats import StatsSubscription
from splitserve.rpc import admin_pb2, admin_pb2_grpc, generation_pb2_grpc
from splitserve.worker.admin import WorkerAdminBackend
from splitserve.worker.core import WorkerCore, start_core
from splitserve.worker.role_switch import RoleSwitcher

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORKER_ID = "switch-0"
GENERATION = "splitserve.v1.Generation"
SWITCHED = admin_pb2.ROLE_SWITCH_OUTCOME_SWITCHED
SERVING = admin_pb2.SERVING_STATE_SERVING


@dataclass
class Worker:
    core: WorkerCore
    roles: RoleSwitcher
    server: GrpcServer
    channel: grpc.aio.Channel

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.channel)

    async def set_role(self, role: str, grace_s: float = 30.0) -> admin_pb2.SetRoleResponse:
        return await self.admin.SetRole(admin_pb2.SetRoleRequest(role=role, grace_s=grace_s),
                                        timeout=grace_s + 30)

    async def status(self) -> admin_pb2.GetStatusResponse:
        return await self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)

    async def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return reply.status

    async def generate(self, **fields: object) -> list[int]:
        stub = generation_pb2_grpc.GenerationStub(self.channel)
        return [t async for chunk in stub.Generate(greedy(**fields), timeout=120)
                for t in chunk.token_ids]


@pytest.fixture
async def worker(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Worker]:
    """A decode worker wired as daemons/worker.py wires one."""
    config = WorkerConfig(role="decode", worker_id=WORKER_ID, grpc_address="127.0.0.1:0",
                          nats_url=nats_server.url, stats_interval_s=0.2,
                          engine=EngineConfig(kv_cache_memory_mb=96, max_num_seqs=16))
    core = await start_core(config)
    roles = RoleSwitcher(core)
    server = await start_grpc_server("127.0.0.1:0", roles, WorkerAdminBackend(core, roles),
                                     serving=False)
    server.set_generation_enabled(True)
    channel = grpc.aio.insecure_channel(server.address)
    try:
        await core.start_messaging(server.address)
        await roles.start()
        server.set_serving(True)
        yield Worker(core, roles, server, channel)
    finally:
        await channel.close()
        await roles.stop()
        await server.stop(0)
        await core.stop()


async def registered_role(worker: Worker) -> str:
    registry = await WorkerRegistry.open(worker.core.broker.js, worker.core.bucket_settings)
    data = await registry.get(WORKER_ID)
    assert data is not None
    descriptor = parse_descriptor(WORKER_ID, data)
    assert descriptor is not None
    return descriptor.role


async def next_stats_role(worker: Worker, role: str) -> str:
    """The role of the next WorkerStats on `splitserve.stats.<role>.<id>`."""
    subscription = await StatsSubscription.subscribe(worker.core.broker.nc, role=role,
                                                     worker_id=WORKER_ID)
    try:
        return (await subscription.next(timeout_s=10)).role
    finally:
        await subscription.close()


async def test_unknown_role_and_bad_grace_are_invalid_argument(worker: Worker) -> None:
    for role, grace_s, field in (("bogus", 1.0, "role"), ("", 1.0, "role"),
                                 ("prefill", -1.0, "grace_s"), ("prefill", 4000.0, "grace_s")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await worker.set_role(role, grace_s)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (role, grace_s)
        assert field in (err.value.details() or "")
    assert worker.core.role == "decode" and await worker.health(GENERATION) == 1


async def test_the_role_in_force_is_unchanged_without_a_drain(worker: Worker) -> None:
    resp = await worker.set_role("decode", grace_s=0)
    assert (resp.role, resp.previous_role, resp.state, resp.outcome, resp.num_in_flight) == (
        "decode", "decode", SERVING, admin_pb2.ROLE_SWITCH_OUTCOME_UNCHANGED, 0)
    status = await worker.status()
    assert status.counters.num_role_switches == 0 and status.state == SERVING


async def test_switch_to_prefill_and_back(worker: Worker) -> None:
    before = await worker.generate(max_tokens=12)
    resp = await worker.set_role("prefill", grace_s=10)
    assert (resp.role, resp.previous_role, resp.state, resp.outcome) == (
        "prefill", "decode", SERVING, SWITCHED)
    status = await worker.status()
    assert (status.role, status.state, status.counters.num_role_switches) == (
        "prefill", SERVING, 1)
    assert await registered_role(worker) == "prefill"
    assert await next_stats_role(worker, "prefill") == "prefill"
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)
    assert (await worker.health(""), await worker.health(GENERATION)) == (serving, not_serving)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.generate(max_tokens=4)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "prefill worker" in (err.value.details() or "")
    workers = await worker.admin.ListWorkers(admin_pb2.ListWorkersRequest(), timeout=10)
    assert [(w.worker_id, w.role) for w in workers.workers] == [(WORKER_ID, "prefill")]

    resp = await worker.set_role("decode", grace_s=10)
    assert (resp.role, resp.previous_role, resp.outcome) == ("decode", "prefill", SWITCHED)
    assert await registered_role(worker) == "decode"
    assert await next_stats_role(worker, "decode") == "decode"
    assert (await worker.health(""), await worker.health(GENERATION)) == (serving, serving)
    assert await worker.generate(max_tokens=12) == before
    status = await worker.status()
    assert (status.role, status.counters.num_role_switches) == ("decode", 2)
    # observer, busy edge, KV events once
    assert len(worker.core.engine.stats_listeners) == 3


async def test_one_switch_at_a_time_and_a_grace_that_runs_out(worker: Worker) -> None:
    expected = await worker.generate(max_tokens=48, ignore_eos=True)
    long_call = asyncio.create_task(worker.generate(max_tokens=48, ignore_eos=True))
    while (await worker.status()).num_in_flight == 0:
        await asyncio.sleep(0.01)

    # Grace 0 with a request in flight: the old role stays, the request goes on.
    resp = await worker.set_role("prefill", grace_s=0)
    assert (resp.role, resp.previous_role, resp.state, resp.outcome) == (
        "decode", "decode", SERVING, admin_pb2.ROLE_SWITCH_OUTCOME_TIMED_OUT)
    assert resp.num_in_flight >= 1 and await worker.health(GENERATION) == 1

    # A switch waiting for that request: a second one, a Resume and Generate are refused.
    switch = asyncio.create_task(worker.set_role("prefill", grace_s=60))
    while not worker.roles.is_switching:
        await asyncio.sleep(0.01)
    for call in (worker.set_role("decode", 1.0), worker.set_role("prefill", 1.0),
                 worker.admin.Resume(admin_pb2.ResumeRequest(), timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.generate(max_tokens=4)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await long_call == expected  # nothing cut off
    resp = await switch
    assert (resp.role, resp.outcome) == ("prefill", SWITCHED)
    assert (await worker.set_role("decode", 10)).outcome == SWITCHED
    assert await worker.generate(max_tokens=48, ignore_eos=True) == expected


async def test_a_worker_turning_busy_publishes_its_stats_at_once(
        nats_server: NatsServer) -> None:
    """Not up to `stats_interval_s` later: a planner reading idle stats of a worker
    taking a burst drained it instead of an idle one (CI)."""
    config = WorkerConfig(role="decode", worker_id=WORKER_ID, grpc_address="127.0.0.1:0",
                          nats_url=nats_server.url, stats_interval_s=120,
                          engine=EngineConfig(kv_cache_memory_mb=96, max_num_seqs=16))
    core = await start_core(config)
    try:
        await core.start_messaging("127.0.0.1:1")
        subscription = await StatsSubscription.subscribe(core.broker.nc, worker_id=WORKER_ID)
        stream = core.engine.generate("burst", list(range(20, 80)),
                                      SamplingParams(max_tokens=64, temperature=0,
                                                     ignore_eos=True))
        first = asyncio.ensure_future(anext(stream))
        stats = await subscription.next(timeout_s=10)
        assert stats.num_running + stats.queue_depth == 1
        await first
        await stream.aclose()
        await subscription.close()
    finally:
        await core.stop()
