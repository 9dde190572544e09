"""Generation entirely inside this worker: tokenize, prefill and decode locally."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from splitserve.engine.async_engine import AsyncEngine
from splitserve.ingress import (
    GenerateRequest,
    GenerationChunk,
    Timing,
    check_request_id,
    tokenize,
)


class LocalGenerationService:
    """A `GenerationService` with no remote prefill (colocated serving)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise ValueError("a generation service needs a model with a tokenizer")
        self.tokenizer = tokenizer

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        request_id = check_request_id(request.request_id)
        prompt_ids = await asyncio.to_thread(tokenize, self.tokenizer, request)
        start = time.monotonic()
        first_s: float | None = None
        async for out in self.engine.generate(request_id, prompt_ids, request.params):
            now = time.monotonic()
            first_s = first_s or now
            timing = None
            if out.finished:
                scheduled_s = out.first_scheduled_s or start
                timing = Timing(queue_ms=max(0.0, scheduled_s - start) * 1e3,
                                ttft_ms=(first_s - start) * 1e3,
                                total_ms=(now - start) * 1e3, prefill="local")
            yield GenerationChunk(request_id, out.new_token_ids, out.text_delta, out, timing)
