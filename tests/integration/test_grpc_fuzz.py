"""Fuzzing Generation/Generate on a real worker: randomly mutated GenerateRequests, sent as
raw bytes, never get INTERNAL or UNKNOWN (each gets a result or a client-error status),
and the worker serves a normal request afterwards.

A seeded generator: start from a valid request with random fields, then mutate its wire
bytes (flip bits, overwrite, insert, delete, truncate, splice in a field with a random
tag and wire type, repeat a chunk). `make test` sends FUZZ_REQUESTS; the issue's 10,000:

    .venv/bin/python -m pytest tests/integration/test_grpc_fuzz.py --fuzz-requests 10000
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import grpc
import pytest
from grpc_fixtures import GrpcWorker, greedy

from splitserve.rpc import generation_pb2

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

METHOD = "/splitserve.v1.Generation/Generate"
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_TIMEOUT_S = 2.0  # a mutated max_tokens may ask for thousands of tokens: cut it short
CONCURRENCY = 16
WORDS = ["Paris", "the", "é", "日本", "\x00", "<|im_start|>", " ", "stop", "\ud7ff"]


def valid_request(rng: random.Random) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(max_tokens=rng.randint(1, 4))
    if rng.random() < 0.5:
        req.text = " ".join(rng.choices(WORDS, k=rng.randint(0, 8)))
    else:
        req.token_ids.extend(rng.randint(0, 49_200) for _ in range(rng.randint(0, 12)))
    for name, value in (("chat", rng.random() < 0.5), ("temperature", rng.random() * 2),
                        ("top_p", rng.random()), ("top_k", rng.randint(0, 100)),
                        ("seed", rng.randint(0, 1 << 40)), ("ignore_eos", rng.random() < 0.5),
                        ("priority", rng.choice(["low", "normal", "high", "high", "x" * 40])),
                        ("request_id", rng.choice(["", "", "", "é" * 3, "a" * 300]))):
        if rng.random() < 0.5:
            setattr(req, name, value)
    if rng.random() < 0.3:
        req.stop.extend(rng.choices(WORDS, k=2))
        req.stop_token_ids.extend(rng.randint(0, 49_200) for _ in range(2))
    return req


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([0, 1, 1, 2, 4])):  # 0: the random request as it is
        op = rng.randrange(7)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and buf:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 4:
            del buf[pos:]
        elif op == 5:  # a field with a random tag and wire type, and a random payload
            field, wire = rng.randint(1, 20), rng.choice([0, 1, 2, 5, 3, 4, 6, 7])
            payload = {0: varint(rng.getrandbits(rng.choice([7, 32, 64]))),
                       1: rng.randbytes(8), 5: rng.randbytes(4),
                       2: varint(rng.choice([0, 3, 1 << 20, 1 << 31])) + rng.randbytes(3)
                       }.get(wire, b"")
            buf[pos:pos] = varint(field << 3 | wire) + payload
        elif buf:
            chunk = buf[pos:pos + rng.randint(1, 16)]
            buf[pos:pos] = chunk * rng.randint(1, 4)
    return bytes(buf)


async def send(channel: grpc.aio.Channel, data: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(METHOD)(data, timeout=CALL_TIMEOUT_S)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_mutated_requests_never_get_internal_or_unknown(
        grpc_worker: GrpcWorker, request: pytest.FixtureRequest) -> None:
    num_requests = request.config.getoption("--fuzz-requests")
    rng = random.Random(20261203)
    payloads = [mutate(valid_request(rng).SerializeToString(), rng) for _ in range(num_requests)]
    codes: Counter[grpc.StatusCode] = Counter()
    bad: list[tuple[bytes, grpc.StatusCode]] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for data in payloads:
        queue.put_nowait(data)

    async def worker() -> None:
        while not queue.empty():
            data = queue.get_nowait()
            code = await send(grpc_worker.channel, data)
            codes[code] += 1
            if code in FORBIDDEN:
                bad.append((data, code))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert sum(codes.values()) == num_requests
    assert bad == [], bad[:5]
    assert codes[grpc.StatusCode.INVALID_ARGUMENT] > 0 and codes[grpc.StatusCode.OK] > 0, codes
    # still serving, token for token as before
    chunks = await grpc_worker.generate(greedy())
    assert "Paris" in "".join(c.text for c in chunks)
    status = await grpc_worker.status()
    assert status.num_running == 0 and status.num_waiting == 0
