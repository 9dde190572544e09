"""An operator's view: grpcurl against a real worker through server reflection only."""

from __future__ import annotations

import json

import pytest
from grpc_fixtures import CAPITAL_PROMPT, GRPCURL, WORKER_ID, GrpcWorker, json_stream, run_tool

from splitserve.control.server import start_grpc_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def grpcurl(worker: GrpcWorker, *args: str) -> tuple[int, str, str]:
    return await run_tool(GRPCURL, "-plaintext", *args[:-1], worker.address, args[-1])


async def test_list_shows_our_services_health_and_reflection(grpc_worker: GrpcWorker) -> None:
    rc, out, err = await run_tool(GRPCURL, "-plaintext", grpc_worker.address, "list")
    assert rc == 0, err
    assert set(out.split()) == {"splitserve.v1.Generation", "splitserve.v1.Admin",
                                "grpc.health.v1.Health",
                                "grpc.reflection.v1alpha.ServerReflection"}
    rc, out, err = await run_tool(GRPCURL, "-plaintext", grpc_worker.address, "describe",
                                  "splitserve.v1.GenerateRequest")
    assert rc == 0, err
    assert "optional uint32 max_tokens" in out and "repeated uint32 token_ids" in out


async def test_generate_streams_paris_from_json(grpc_worker: GrpcWorker) -> None:
    body = json.dumps({"text": CAPITAL_PROMPT, "chat": True, "max_tokens": 16,
                       "temperature": 0, "request_id": "grpcurl-1"})
    rc, out, err = await grpcurl(grpc_worker, "-d", body, "splitserve.v1.Generation/Generate")
    assert rc == 0, err
    chunks = json_stream(out)
    assert len(chunks) > 2  # streamed, not one blob
    assert all(c["request_id"] == "grpcurl-1" for c in chunks)
    assert "Paris" in "".join(c.get("text", "") for c in chunks)
    assert all("finish_reason" not in c for c in chunks[:-1])  # UNSPECIFIED is omitted
    last = chunks[-1]
    assert last["finish_reason"] == "FINISH_REASON_STOP"
    timing = last["timing"]
    assert timing["prefill"] == "local" and timing["num_attempts"] == 1
    assert timing["num_output_tokens"] == sum(len(c.get("token_ids", [])) for c in chunks)
    assert 0 < timing["ttft_ms"] <= timing["total_ms"]


async def test_admin_status_workers_and_health(grpc_worker: GrpcWorker) -> None:
    rc, out, err = await grpcurl(grpc_worker, "splitserve.v1.Admin/GetStatus")
    assert rc == 0, err
    status = json.loads(out)
    assert status["worker_id"] == WORKER_ID and status["role"] == "decode"
    assert status["state"] == "SERVING_STATE_SERVING"
    assert status["num_pages_total"] == 64 and status["num_pages_free"] == 64
    assert "num_pages_used" not in status  # 0: proto3 JSON omits it
    assert len(status["config_hash"]) == 16 and status["model_fingerprint"]

    rc, out, err = await grpcurl(grpc_worker, "splitserve.v1.Admin/ListWorkers")
    assert rc == 0, err
    (worker,) = json.loads(out)["workers"]
    assert worker["grpc_address"] == grpc_worker.address
    assert (worker["num_pages"], worker["page_size"], worker["dtype"]) == (64, 16, "float32")

    for service in ("", "splitserve.v1.Generation", "splitserve.v1.Admin"):
        rc, out, err = await grpcurl(grpc_worker, "-d", json.dumps({"service": service}),
                                     "grpc.health.v1.Health/Check")
        assert rc == 0, err
        assert json.loads(out) == {"status": "SERVING"}, service
    rc, out, err = await grpcurl(grpc_worker, "-d", '{"service": "nope"}',
                                 "grpc.health.v1.Health/Check")
    assert rc != 0 and "NotFound" in err


async def test_bad_json_request_is_invalid_argument(grpc_worker: GrpcWorker) -> None:
    rc, _, err = await grpcurl(grpc_worker, "-d", '{"text": "hi", "top_p": 2}',
                                 "splitserve.v1.Generation/Generate")
    assert rc != 0
    assert "Code: InvalidArgument" in err and "top_p must be in (0, 1], got 2.0" in err


async def test_server_without_generation_lists_admin_only(grpc_worker: GrpcWorker) -> None:
    """A prefill or planner daemon: Admin, health and reflection, no Generation."""
    server = await start_grpc_server("127.0.0.1:0", None, grpc_worker.admin)
    try:
        rc, out, err = await run_tool(GRPCURL, "-plaintext", server.address, "list")
        assert rc == 0, err
        assert "splitserve.v1.Admin" in out.split()
        assert "splitserve.v1.Generation" not in out
        rc, _, err = await run_tool(GRPCURL, "-plaintext", "-d",
                                    '{"service": "splitserve.v1.Generation"}', server.address,
                                    "grpc.health.v1.Health/Check")
        assert rc != 0 and "NotFound" in err
    finally:
        await server.stop(0)
