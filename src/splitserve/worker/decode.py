"""Decode role: ingress, the offload decision, decode and streaming.

Life cycle of a request:
1. tokenize and validate (typed errors → INVALID_ARGUMENT / RESOURCE_EXHAUSTED);
2. measure the prefix-cache hit and decide local vs remote prefill
   (`routing.should_offload_prefill`);
3. local: the engine prefills in chunks between decode steps, then decodes;
4. remote: `RemotePrefillClient` (worker/remote.py) lands the prompt's KV through
   one or more leased attempts, or queues a local prefill when they fail;
5. stream chunks; a client that goes away aborts the request (pages freed, landing
   pages quarantined).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.output import RequestOutput
from splitserve.engine.page_allocator import page_hashes
from splitserve.worker.core import WorkerCore
from splitserve.worker.ingress import (
    GenerateRequest,
    GenerationChunk,
    Timing,
    check_request_id,
    tokenize,
)
from splitserve.worker.remote import RemotePrefillClient

log = logging.getLogger(__name__)


class DecodeService:
    """The decode role; a `GenerationService` for the gRPC `Generation` servicer."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        assert core.async_engine is not None
        self.engine: AsyncEngine = core.async_engine
        tokenizer = core.async_engine.engine.tokenizer
        if tokenizer is None:
            raise ValueError("the decode role needs a model with a tokenizer")
        self.tokenizer = tokenizer
        self.remote = RemotePrefillClient(core, self.engine)

    async def start(self) -> None:
        await self.remote.start()

    async def stop(self) -> None:
        await self.remote.stop()

    @property
    def num_in_flight(self) -> int:
        engine = self.engine.engine
        return (len(engine.scheduler.running) + len(engine.scheduler.waiting)
                + self.remote.num_waiting)

    # --- ingress ------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        request_id = check_request_id(request.request_id)
        # Up to 1 MiB of text: tokenize off the event loop, which serves every stream.
        prompt = await asyncio.to_thread(tokenize, self.tokenizer, request)
        engine = self.engine.engine
        try:
            engine.validate(prompt, request.params)  # reads only immutable config
        except Exception:
            self.core.counters.num_rejects += 1
            raise
        start_s = time.monotonic()
        effective_len = len(prompt) - self._num_cached_tokens(prompt)
        remote = self.remote.should_offload(effective_len, request.priority)
        stream = self.engine.open_stream(request_id)
        finished = False
        prefill, num_attempts = "none", 1
        try:
            if remote:
                outcome = await self.remote.prefill(request_id, prompt, request, effective_len)
                prefill, num_attempts = outcome.prefill, outcome.num_attempts
            if prefill == "none":  # local from the start (or no room for landing pages)
                prefill, num_attempts = "local", 1
                await self.engine.call(lambda e: e.add_request(request_id, prompt,
                                                               request.params))
                self.core.counters.num_local_prefills += 1
            first_s: float | None = None
            async for out in self.engine.iterate(request_id, stream):
                now = time.monotonic()
                if first_s is None:
                    first_s = now
                    self.core.counters.ttft_ms.append((now - start_s) * 1e3)
                finished = out.finished
                yield self._chunk(out, start_s, first_s, now, prefill, num_attempts)
        finally:
            self.engine.close_stream(request_id)
            if not finished and self.engine.is_running:
                self.engine.call(lambda e: e.abort(request_id))

    def _chunk(self, out: RequestOutput, start_s: float, first_s: float, now: float,
               prefill: str, num_attempts: int) -> GenerationChunk:
        timing = None
        if out.finished:
            self.core.counters.num_finished += 1
            timing = Timing(queue_ms=0.0, ttft_ms=(first_s - start_s) * 1e3,
                            total_ms=(now - start_s) * 1e3, prefill=prefill,
                            num_attempts=num_attempts)
        return GenerationChunk(out.request_id, out.new_token_ids, out.text_delta, out, timing)

    def _num_cached_tokens(self, prompt: list[int]) -> int:
        engine = self.engine.engine
        if not engine.config.enable_prefix_cache:
            return 0
        ps = engine.config.page_size
        cached = engine.allocator.count_cached_prefix(page_hashes(prompt[:-1], ps))
        return cached * ps
