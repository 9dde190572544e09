"""A client that goes away aborts its request in the engine: pages come back at once."""

from __future__ import annotations

import grpc
import pytest
from grpc_fixtures import GrpcWorker, greedy, wait_until

from splitserve import client
from splitserve.rpc import generation_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

# Far more tokens than a test waits for (~25 ms each on a CPU), so finishing on its
# own is never what frees the pages.
LONG = {"max_tokens": 400, "ignore_eos": True}


async def engine_idle(worker: GrpcWorker) -> bool:
    status = await worker.status()
    return (status.num_pages_used, status.num_running, status.num_waiting,
            status.num_in_flight) == (0, 0, 0, 0)


async def assert_aborted(worker: GrpcWorker) -> None:
    await wait_until(lambda: engine_idle(worker), 5.0, "the request's pages to be freed")
    status = await worker.status()
    assert status.counters.num_requests_finished == 0  # aborted, not run to the end
    assert status.num_pages_free == status.num_pages_total


async def test_client_cancel_mid_stream_aborts_and_frees_pages(grpc_worker: GrpcWorker) -> None:
    call = grpc_worker.generation.Generate(greedy(**LONG), timeout=60)
    metadata = dict(await call.initial_metadata() or ())
    assert len(metadata["splitserve-request-id"]) == 32  # assigned by the server
    for _ in range(3):
        chunk = await call.read()
        assert chunk.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED
    status = await grpc_worker.status()
    # 37 prompt tokens + at least 3 generated, 16 per page (the engine may run ahead).
    assert status.num_pages_used >= 3
    assert (status.num_running, status.num_in_flight) == (1, 1)

    assert call.cancel()
    await assert_aborted(grpc_worker)


async def test_deadline_exceeded_aborts_and_frees_pages(grpc_worker: GrpcWorker) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_worker.generate(greedy(**LONG), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_aborted(grpc_worker)


async def test_leaving_the_client_stream_early_cancels(grpc_worker: GrpcWorker) -> None:
    stream = client.stream_generate(grpc_worker.address, greedy(**LONG))
    num_chunks = 0
    async for _ in stream:
        num_chunks += 1
        if num_chunks == 2:
            break
    await stream.aclose()
    await assert_aborted(grpc_worker)


async def test_duplicate_request_id_is_already_exists(grpc_worker: GrpcWorker) -> None:
    call = grpc_worker.generation.Generate(greedy(request_id="dup", **LONG), timeout=60)
    await call.read()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_worker.generate(greedy(request_id="dup", max_tokens=2))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "'dup' is already running" in (info.value.details() or "")
    call.cancel()
    await assert_aborted(grpc_worker)


async def test_stopped_engine_is_unavailable_and_status_still_answers(
        grpc_worker: GrpcWorker) -> None:
    await grpc_worker.engine.stop()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_worker.generate(greedy(max_tokens=2))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "engine is not running" in (info.value.details() or "")
    status = await grpc_worker.status()
    assert (status.num_pages_used, status.num_pages_total) == (0, 64)
