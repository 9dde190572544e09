"""Decode role: ingress, the offload decision, decode and streaming.

Life cycle of a request:
0. the caller's request id is a label: one already in flight here gets ALREADY_EXISTS
   before anything is touched; the request itself runs under an internal id (engine
   sequence, output stream, KVReady wait, job Msg-Id) that no caller can repeat;
1. tokenize and validate off the event loop (typed errors → INVALID_ARGUMENT /
   RESOURCE_EXHAUSTED);
2. on the engine thread, in one call: measure the prefix-cache hit, decide local vs
   remote prefill (`routing.should_offload_prefill`) and queue the request (local) or
   reserve its landing pages (remote).
   The thresholds are the routing policy in force when the request arrives: the config
   file's `routing:` with the fields of key `routing` in `splitserve-policy` on top,
   followed live (`worker/policy.py`; GetStatus.policy_revision says which revision);
3. local: the engine prefills in chunks between decode steps, then decodes;
4. remote: `RemotePrefillClient` (worker/remote.py) lands the prompt's KV through
   one or more leased attempts, or queues a local prefill when they fail;
5. stream chunks; a client that goes away aborts the request (pages freed, landing
   pages quarantined);
6. what the prefix cache gained and lost goes to the routers (worker/kv_events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.errors import DuplicateRequest
from splitserve.engine.llm_engine import Engine
from splitserve.engine.output import RequestOutput
from splitserve.ingress import (
    GenerateRequest,
    GenerationChunk,
    Timing,
    check_request_id,
    new_request_id,
    prepare_prompt,
)
from splitserve.tasks import logged_task, stop_tasks
from splitserve.worker.core import WorkerCore
from splitserve.worker.kv_events import KVEventPublisher
from splitserve.worker.observer import FirstToken
from splitserve.worker.remote import (
    PrefillPath,
    RemoteOutcome,
    RemotePrefillClient,
    RemoteStart,
)

log = logging.getLogger(__name__)


class DecodeService:
    """The decode role; a `GenerationService` for the gRPC `Generation` servicer."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.engine: AsyncEngine = core.engine
        tokenizer = core.engine.tokenizer
        if tokenizer is None:
            raise ValueError("the decode role needs a model with a tokenizer")
        self.tokenizer = tokenizer
        self.remote = RemotePrefillClient(core, self.engine)
        core.remote_queue_depth = lambda: self.remote.queue_depth
        self._labels: set[str] = set()  # caller request ids in flight
        self.kv_events = KVEventPublisher(core.worker_id, core.incarnation,
                                          self.engine.info.page_size)
        self._kv_events_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.remote.start()
        self.engine.stats_listeners.append(self.kv_events.on_stats)
        await self.engine.call(lambda e: e.record_kv_events())
        self._kv_events_task = logged_task(self.kv_events.run(self.core.broker),
                                           "KV events publisher")

    async def stop(self) -> None:
        """Stop the role's tasks; the core (engine, broker, registry) goes on, so that a
        role switch can start the other role on it."""
        await stop_tasks(self._kv_events_task)
        with contextlib.suppress(ValueError):  # never started
            self.engine.stats_listeners.remove(self.kv_events.on_stats)
        await self.remote.stop()
        self.core.remote_queue_depth = lambda: 0

    @property
    def num_in_flight(self) -> int:
        """Requests in the engine (as of its latest snapshot) or between attempts."""
        stats = self.engine.stats
        return stats.num_running + stats.num_waiting + self.remote.num_waiting

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
        try:
            # Per-token work (up to 1 MiB of text): off the loop, which serves every stream.
            prompt = await asyncio.to_thread(prepare_prompt, self.tokenizer,
                                             self.engine.validate, request)
        except Exception:
            self.core.counters.num_rejects += 1
            raise
        start_s = time.monotonic()
        offload = self.remote.offload_rule(request.priority)
        reserve = self.remote.reserve_rule(request_id, prompt, request)

        def admit(e: Engine) -> RemoteStart | None:
            """On the engine thread, mid-step (it adds a sequence and takes free or
            unreferenced pages only): the first remote attempt if the request goes
            remote; else None, and the request is queued for a local prefill."""
            effective_len = len(prompt) - e.cached_prefix_tokens(prompt)
            stats = e.stats()
            if offload(effective_len, stats.decode_load, stats.num_remote_pending):
                return reserve(e, effective_len)
            e.add_request(request_id, prompt, request.params, priority=request.priority)
            return None

        stream = self.engine.open_stream(request_id)
        finished = False
        outcome = RemoteOutcome(PrefillPath.LOCAL, 1)
        try:
            remote = await self.engine.call(admit, mid_step=True)
            if remote is None:
                self.core.counters.num_offload_local += 1
                self.core.counters.num_local_prefills += 1
            else:
                self.core.counters.num_offload_remote += 1
                outcome = await self.remote.prefill(request_id, prompt, request, remote)
            if outcome.path is PrefillPath.NONE:  # no room for landing pages: local after all
                outcome = RemoteOutcome(PrefillPath.LOCAL, 1)
                await self.engine.call(lambda e: e.add_request(
                    request_id, prompt, request.params, priority=request.priority),
                    mid_step=True)
                self.core.counters.num_local_prefills += 1  # (fallbacks count in remote.py)
            log.debug("request %s runs as %s (%s prefill)", label, request_id,
                      outcome.path.value)
            first: FirstToken | None = None
            last_s = start_s
            async for out in self.engine.iterate(request_id, stream):
                now = time.monotonic()
                if first is None:
                    first = _first_token(start_s, now, out, outcome)
                    self.core.observer.first_token(first, len(out.new_token_ids))
                else:
                    self.core.observer.tokens(now, now - last_s, len(out.new_token_ids))
                last_s = now
                finished = out.finished
                yield self._chunk(label, out, first, now, outcome)
        finally:
            self.engine.close_stream(request_id)
            if not finished and self.engine.is_running:
                self.engine.call(lambda e: e.abort(request_id))

    def _chunk(self, label: str, out: RequestOutput, first: FirstToken, now: float,
               outcome: RemoteOutcome) -> GenerationChunk:
        timing = None
        if out.finished:
            self.core.counters.num_finished += 1
            reason = out.finish_reason.value if out.finish_reason else "unknown"
            self.core.observer.finished(now, first, reason, out.num_prompt_tokens,
                                        out.num_output_tokens)
            timing = Timing(queue_ms=first.queue_s * 1e3,
                            ttft_ms=(first.at_s - first.start_s) * 1e3,
                            total_ms=(now - first.start_s) * 1e3, prefill=first.path,
                            num_attempts=max(1, outcome.num_attempts))
        return GenerationChunk(label, out.new_token_ids, out.text_delta, out, timing)


def _first_token(start_s: float, now: float, out: RequestOutput,
                 outcome: RemoteOutcome) -> FirstToken:
    """Queue and prefill time of a request at its first token: a local prefill starts
    when the engine first schedules it; a remote one when a prefill worker dequeues
    its job (as the accepted attempt's KVReady says)."""
    num_prefill_tokens = out.num_prompt_tokens - out.num_cached_tokens
    if outcome.path is PrefillPath.REMOTE:
        return FirstToken(start_s, now, outcome.queue_s, outcome.prefill_s, "remote",
                          num_prefill_tokens)
    scheduled_s = out.first_scheduled_s if out.first_scheduled_s is not None else start_s
    return FirstToken(start_s, now, max(0.0, scheduled_s - start_s),
                      max(0.0, now - scheduled_s), "local", num_prefill_tokens)
