"""Bad input over gRPC gets a deliberate status code naming the field; the worker survives."""

from __future__ import annotations

import math
from typing import Any

import grpc
import pytest
from grpc_fixtures import CAPITAL_PROMPT, GrpcWorker, greedy

from splitserve.rpc import generation_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# The worker under test: context 256 tokens, KV pool 8 pages x 16 = 128 tokens.
ENGINE = {"max_model_len": 256, "num_pages": 8}

# (case, request, code, field in trailing metadata, substrings of the message)
CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, str | None, tuple[str, ...]]] = [
    ("empty prompt", {"text": ""}, INVALID, "prompt", ("prompt is empty",)),
    ("neither prompt field", {"text": None}, INVALID, "text",
     ("text", "token_ids", "neither")),
    ("both prompt fields", {"token_ids": [1, 2]}, INVALID, "text",
     ("text", "token_ids", "both")),
    ("max_tokens 0", {"max_tokens": 0}, INVALID, "max_tokens", ("max_tokens must be >= 1",)),
    ("temperature -1", {"temperature": -1.0}, INVALID, "temperature",
     ("temperature must be >= 0",)),
    ("temperature nan", {"temperature": math.nan}, INVALID, "temperature", ("temperature",)),
    ("top_p 2", {"top_p": 2.0}, INVALID, "top_p", ("top_p must be in (0, 1]",)),
    ("top_p 0", {"top_p": 0.0}, INVALID, "top_p", ("top_p",)),
    ("prompt + max_tokens over the context", {"text": None, "token_ids": [1] * 200,
                                              "chat": False, "max_tokens": 100},
     INVALID, "max_tokens", ("exceeds the context length (256)",)),
    ("more KV than the worker has", {"text": None, "token_ids": [1] * 100, "chat": False,
                                     "max_tokens": 100},
     grpc.StatusCode.RESOURCE_EXHAUSTED, None, ("13 KV pages", "has 8")),
    ("5 MB prompt", {"text": "a" * 5_000_000}, INVALID, "prompt",
     ("prompt is 5000000 characters", "limit")),
    ("token id outside the vocabulary", {"text": None, "token_ids": [49152], "chat": False},
     INVALID, "prompt_token_ids", ("token id 49152 is outside the vocabulary",)),
    ("chat with token ids", {"text": None, "token_ids": [1, 2]}, INVALID, "chat", ("chat",)),
    ("stop token outside the vocabulary", {"stop_token_ids": [10**9]}, INVALID,
     "stop_token_ids", ("stop token id 1000000000",)),
    ("empty stop string", {"stop": [""]}, INVALID, "stop", ("stop strings must not be empty",)),
    ("too many stop strings", {"stop": [f"s{i}" for i in range(17)]}, INVALID, "stop",
     ("at most 16 stop strings",)),
    ("request id with a space", {"request_id": "a b"}, INVALID, "request_id", ("request_id",)),
    ("request id with a newline", {"request_id": "a\nb"}, INVALID, "request_id",
     ("request_id",)),
    ("priority with a dot", {"priority": "high.x"}, INVALID, "priority", ("priority",)),
]


async def call_status(worker: GrpcWorker, request: generation_pb2.GenerateRequest
                      ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await worker.generate(request)
    return info.value


async def test_bad_requests_get_status_codes_naming_the_field_then_a_good_one_succeeds(
        grpc_worker_factory: Any) -> None:
    worker = await grpc_worker_factory(**ENGINE)
    failures = []
    for case, fields, code, field, parts in CASES:
        fields = {"max_tokens": 4, **fields}
        text = fields.pop("text", CAPITAL_PROMPT)
        err = await call_status(worker, greedy(text, **fields))
        details = err.details() or ""
        trailing = dict(err.trailing_metadata() or ())
        if err.code() != code or any(p not in details for p in parts) or \
                trailing.get("splitserve-field") != field:
            failures.append(f"{case}: {err.code().name} {details!r} {trailing}")
    assert not failures, "\n".join(failures)

    chunks = await worker.generate(greedy(max_tokens=4))
    assert chunks[-1].finish_reason in (generation_pb2.FINISH_REASON_LENGTH,
                                        generation_pb2.FINISH_REASON_STOP)
    assert 1 <= sum(len(c.token_ids) for c in chunks) <= 4
    status = await worker.status()
    assert status.counters.num_rejects == 1  # the RESOURCE_EXHAUSTED case
    assert status.counters.num_requests_finished == 1
    assert (status.num_pages_used, status.num_running, status.num_in_flight) == (0, 0, 0)


async def test_message_over_the_server_limit_is_refused_by_the_transport(
        grpc_worker: GrpcWorker) -> None:
    """Past MAX_MESSAGE_BYTES (8 MiB) grpc itself refuses; the worker keeps serving."""
    err = await call_status(grpc_worker, greedy("a" * (9 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(await grpc_worker.generate(greedy(max_tokens=2))) >= 1
