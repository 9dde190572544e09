"""AsyncEngine: streaming from asyncio, concurrency, cancellation, errors."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


async def collect(engine: AsyncEngine, request_id: str, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    async for out in engine.generate(request_id, prompt, GREEDY):
        tokens += out.new_token_ids
    return tokens


async def test_concurrent_streams_match_offline_generate(tiny_engine) -> None:
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10] * 17]
    expected = tiny_engine().generate(prompts, GREEDY)
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    try:
        got = await asyncio.gather(*(collect(engine, f"r{i}", p) for i, p in enumerate(prompts)))
    finally:
        await engine.stop()
    assert list(got) == expected


async def test_invalid_request_raises_before_streaming_and_engine_keeps_serving(
        tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    try:
        with pytest.raises(InvalidRequest, match="max_tokens must be >= 1"):
            async for _ in engine.generate("bad", [1], SamplingParams(max_tokens=0)):
                pass
        assert len(await collect(engine, "good", [1, 2])) == 8
    finally:
        await engine.stop()


async def test_abandoned_stream_aborts_and_frees_pages(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    try:
        stream = engine.generate("long", list(range(40)), SamplingParams(max_tokens=400,
                                                                         temperature=0))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if await engine.call(lambda e: not e.has_unfinished):
                break
            await asyncio.sleep(0.01)
        assert await engine.call(lambda e: e.allocator.num_used_pages) == 0
    finally:
        await engine.stop()
