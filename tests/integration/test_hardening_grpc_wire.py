"""Wire-level bad input over a real gRPC server: INVALID_ARGUMENT naming the field, never
UNKNOWN or INTERNAL; the worker, its health and its reflection keep working."""

from __future__ import annotations

import grpc
import pytest
from grpc_fixtures import GrpcWorker, greedy
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from splitserve.control.convert import MAX_PROMPT_TOKENS
from splitserve.rpc import generation_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GENERATE = "/splitserve.v1.Generation/Generate"
BAD_UTF8 = b"\xc3\x28"


async def raw_generate(worker: GrpcWorker, data: bytes) -> list[pb.GenerateChunk]:
    """Send `data` as the request bytes, as a client with a broken serializer would."""
    call = worker.channel.unary_stream(GENERATE, request_serializer=lambda b: b,
                                       response_deserializer=pb.GenerateChunk.FromString)
    return [chunk async for chunk in call(data, timeout=60)]


async def expect_invalid(worker: GrpcWorker, data: bytes) -> tuple[str, str]:
    """The message and the field of the INVALID_ARGUMENT that `data` gets."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_generate(worker, data)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    return err.details() or "", dict(err.trailing_metadata() or ()).get("splitserve-field", "")


async def test_undecodable_bytes_are_invalid_argument_and_the_worker_serves_on(
        grpc_worker: GrpcWorker) -> None:
    text = bytes([1 << 3 | 2, len(BAD_UTF8)]) + BAD_UTF8
    assert await expect_invalid(grpc_worker, text) == ("text is not valid UTF-8", "text")

    priority = greedy(max_tokens=2).SerializeToString() + bytes([12 << 3 | 2, 1, 0xFF])
    assert await expect_invalid(grpc_worker, priority) == ("priority is not valid UTF-8",
                                                           "priority")

    details, field = await expect_invalid(grpc_worker, b"\x0a\x05ab")  # length past the end
    assert field == "request"
    assert details.startswith("request is not a valid splitserve.v1.GenerateRequest")

    # the same raw path with good bytes generates
    chunks = await raw_generate(grpc_worker, greedy(max_tokens=2).SerializeToString())
    assert 1 <= sum(len(c.token_ids) for c in chunks) <= 2
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED


async def test_health_and_reflection_still_list_generation(grpc_worker: GrpcWorker) -> None:
    assert await grpc_worker.health("splitserve.v1.Generation") == \
        health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_worker.channel)
    responses = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="splitserve.v1.Generation"),
    ]), timeout=10)
    listed, described = [r async for r in responses]
    names = {s.name for s in listed.list_services_response.service}
    assert {"splitserve.v1.Generation", "splitserve.v1.Admin", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize(("fields", "field", "details"), [
    ({"request_id": "é-1"}, "request_id",
     "request_id must be at most 128 printable ASCII characters"),
    ({"request_id": "id\u00a0x"}, "request_id", "printable ASCII"),
    ({"priority": "urgent"}, "priority",
     "unknown priority 'urgent'; known classes: high, normal, low (empty: normal)"),
    ({"priority": "HIGH"}, "priority", "known classes: high, normal, low"),
])
async def test_request_id_and_priority_are_checked_at_ingress(
        grpc_worker: GrpcWorker, fields: dict[str, str], field: str, details: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_worker.generate(greedy(max_tokens=2, **fields))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert details in (err.details() or "")
    assert dict(err.trailing_metadata() or ()).get("splitserve-field") == field
    status = await grpc_worker.status()
    assert (status.num_running, status.num_in_flight) == (0, 0)


@pytest.mark.parametrize("num_tokens", [MAX_PROMPT_TOKENS + 1, 4 << 20])
async def test_prompt_over_the_token_cap_is_invalid_argument_naming_token_ids(
        grpc_worker: GrpcWorker, num_tokens: int) -> None:
    request = pb.GenerateRequest(token_ids=[1] * num_tokens, max_tokens=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await grpc_worker.generate(request)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert err.details() == (f"token_ids holds {num_tokens} tokens; the limit is "
                             f"{MAX_PROMPT_TOKENS}")
    assert dict(err.trailing_metadata() or ()).get("splitserve-field") == "token_ids"
    assert len(await grpc_worker.generate(greedy(max_tokens=2))) >= 1
