"""Drain: new requests get UNAVAILABLE, in-flight ones finish, health flips; Resume undoes it."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_fixtures import GrpcWorker, greedy, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.rpc import admin_pb2, generation_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GENERATION = "splitserve.v1.Generation"
ADMIN = "splitserve.v1.Admin"


async def assert_unavailable(worker: GrpcWorker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.generate(greedy(max_tokens=2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (info.value.details() or "")


async def test_drain_refuses_new_requests_finishes_in_flight_and_resume_restores(
        grpc_worker: GrpcWorker) -> None:
    # ~2-3 s of decoding on a CPU: the drain below has to wait for it.
    in_flight = grpc_worker.generation.Generate(greedy(max_tokens=96, ignore_eos=True),
                                                timeout=60)
    first = await in_flight.read()
    assert first.token_ids
    admin = grpc_worker.admin_stub
    started = time.monotonic()
    drain = asyncio.ensure_future(admin.Drain(admin_pb2.DrainRequest(grace_s=50), timeout=60))

    await wait_until(lambda: _health_is(grpc_worker, "", NOT_SERVING), 5.0, "NOT_SERVING")
    assert await grpc_worker.health(GENERATION) == NOT_SERVING
    assert await grpc_worker.health(ADMIN) == SERVING  # the worker can still be operated
    await assert_unavailable(grpc_worker)
    status = await grpc_worker.status()
    assert status.state == admin_pb2.SERVING_STATE_DRAINING
    assert (status.num_in_flight, status.num_running) == (1, 1)
    assert not drain.done()  # still waiting for the in-flight request

    chunks = [first]
    while (chunk := await in_flight.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 96
    drained = await drain
    assert drained.state == admin_pb2.SERVING_STATE_DRAINING and drained.num_in_flight == 0
    assert time.monotonic() - started < 45  # returned when the request ended, not at grace
    await assert_unavailable(grpc_worker)  # stays drained after the wait

    resumed = await admin.Resume(admin_pb2.ResumeRequest(), timeout=10)
    assert resumed.state == admin_pb2.SERVING_STATE_SERVING
    assert await grpc_worker.health("") == SERVING
    assert await grpc_worker.health(GENERATION) == SERVING
    assert (await grpc_worker.status()).state == admin_pb2.SERVING_STATE_SERVING
    assert "Paris" in "".join(c.text for c in await grpc_worker.generate(greedy()))


async def test_drain_returns_when_grace_runs_out(grpc_worker: GrpcWorker) -> None:
    call = grpc_worker.generation.Generate(greedy(max_tokens=400, ignore_eos=True), timeout=60)
    await call.read()
    started = time.monotonic()
    drained = await grpc_worker.admin_stub.Drain(admin_pb2.DrainRequest(grace_s=0.3), timeout=10)
    assert 0.3 <= time.monotonic() - started < 5
    assert drained.state == admin_pb2.SERVING_STATE_DRAINING and drained.num_in_flight == 1
    call.cancel()
    await wait_until(lambda: _idle(grpc_worker), 5.0, "the cancelled request to end")


async def test_bad_grace_is_invalid_argument(grpc_worker: GrpcWorker) -> None:
    for grace_s in (-1.0, float("inf"), 1e9):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await grpc_worker.admin_stub.Drain(admin_pb2.DrainRequest(grace_s=grace_s),
                                               timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grace_s" in (info.value.details() or "")
    assert (await grpc_worker.status()).state == admin_pb2.SERVING_STATE_SERVING


async def test_server_drain_for_sigterm_and_set_serving(grpc_worker: GrpcWorker) -> None:
    """The daemon's SIGTERM path: `GrpcServer.drain` does what Admin.Drain does."""
    assert await grpc_worker.server.drain(0) == "DRAINING"
    assert await grpc_worker.health("") == NOT_SERVING
    await assert_unavailable(grpc_worker)
    assert await grpc_worker.server.resume() == "SERVING"
    assert await grpc_worker.health("") == SERVING
    # Health alone (start-up not finished) does not refuse requests; a drain does.
    grpc_worker.server.set_serving(False)
    assert await grpc_worker.health(GENERATION) == NOT_SERVING
    assert len(await grpc_worker.generate(greedy(max_tokens=2))) >= 1


async def _health_is(worker: GrpcWorker, service: str, status: int) -> bool:
    return await worker.health(service) == status


async def _idle(worker: GrpcWorker) -> bool:
    status = await worker.status()
    return (status.num_in_flight, status.num_pages_used) == (0, 0)


async def test_health_watch_follows_drain_and_resume(grpc_worker: GrpcWorker) -> None:
    stub = health_pb2_grpc.HealthStub(grpc_worker.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=GENERATION), timeout=30)
    assert (await watch.read()).status == SERVING
    await grpc_worker.server.drain(0)
    assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
    await grpc_worker.server.resume()
    assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
    watch.cancel()
