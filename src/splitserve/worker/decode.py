"""Decode role: ingress, the offload decision, decode and streaming.

Life cycle of a request:
0. the caller's request id is a label: one already in flight here gets ALREADY_EXISTS
   before anything is touched; the request itself runs under an internal id (engine
   sequence, output stream, KVReady wait, job Msg-Id) that no caller can repeat;
1. tokenize and validate off the event loop (typed errors → INVALID_ARGUMENT /
   RESOURCE_EXHAUSTED);
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
from dataclasses import replace

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import DuplicateRequest
from splitserve.engine.output import RequestOutput
from splitserve.engine.page_allocator import page_hashes
from splitserve.ingress import (
    GenerateRequest,
    GenerationChunk,
    Timing,
    check_request_id,
    new_request_id,
    prepare_prompt,
)
from splitserve.worker.core import WorkerCore
from splitserve.worker.remote import PrefillPath, RemotePrefillClient

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
        self._labels: set[str] = set()  # caller request ids in flight

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
        label = check_request_id(request.request_id)
        if label in self._labels:
            self.core.counters.num_duplicate_ids += 1
            raise DuplicateRequest(label)
        self._labels.add(label)
        try:
            async for chunk in self._generate(replace(request, request_id=label)):
                yield chunk
        finally:
            self._labels.discard(label)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        label, request_id = request.request_id, new_request_id()
        engine = self.engine.engine
        try:
            # Per-token work (up to 1 MiB of text): off the loop, which serves every stream.
            prompt = await asyncio.to_thread(prepare_prompt, self.tokenizer, engine.validate,
                                             request)
        except Exception:
            self.core.counters.num_rejects += 1
            raise
        start_s = time.monotonic()
        effective_len = len(prompt) - self._num_cached_tokens(prompt)
        remote = self.remote.should_offload(effective_len, request.priority)
        stream = self.engine.open_stream(request_id)
        finished = False
        path, num_attempts = PrefillPath.NONE, 1
        try:
            if remote:
                outcome = await self.remote.prefill(request_id, prompt, request, effective_len)
                path, num_attempts = outcome.path, outcome.num_attempts
            if path is PrefillPath.NONE:  # local from the start (or no room for landing pages)
                path, num_attempts = PrefillPath.LOCAL, 1
                await self.engine.call(lambda e: e.add_request(request_id, prompt,
                                                               request.params))
                self.core.counters.num_local_prefills += 1
            log.debug("request %s runs as %s (%s prefill)", label, request_id, path.value)
            first_s: float | None = None
            async for out in self.engine.iterate(request_id, stream):
                now = time.monotonic()
                if first_s is None:
                    first_s = now
                    self.core.counters.ttft_ms.append((now - start_s) * 1e3)
                finished = out.finished
                yield self._chunk(label, out, start_s, first_s, now, path, num_attempts)
        finally:
            self.engine.close_stream(request_id)
            if not finished and self.engine.is_running:
                self.engine.call(lambda e: e.abort(request_id))

    def _chunk(self, label: str, out: RequestOutput, start_s: float, first_s: float,
               now: float, path: PrefillPath, num_attempts: int) -> GenerationChunk:
        timing = None
        if out.finished:
            self.core.counters.num_finished += 1
            timing = Timing(queue_ms=0.0, ttft_ms=(first_s - start_s) * 1e3,
                            total_ms=(now - start_s) * 1e3, prefill=path.value,
                            num_attempts=num_attempts)
        return GenerationChunk(label, out.new_token_ids, out.text_delta, out, timing)

    def _num_cached_tokens(self, prompt: list[int]) -> int:
        engine = self.engine.engine
        if not engine.config.enable_prefix_cache:
            return 0
        ps = engine.config.page_size
        cached = engine.allocator.count_cached_prefix(page_hashes(prompt[:-1], ps))
        return cached * ps
