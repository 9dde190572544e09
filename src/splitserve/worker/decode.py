"""Decode role: ingress, the offload decision, remote prefill with leases, decode.

Life cycle of a request:
1. tokenize and validate (typed errors → INVALID_ARGUMENT / RESOURCE_EXHAUSTED);
2. measure the prefix-cache hit and decide local vs remote prefill
   (`routing.should_offload_prefill`);
3. local: the engine prefills in chunks between decode steps, then decodes;
4. remote: reserve landing pages, publish a `PrefillJob` (Msg-Id request:attempt)
   with a lease deadline, wait for the `KVReady` notification of that attempt;
5. KVReady in time: the engine copies the partial last page and starts decoding
   after the first token; no KVReady by the deadline (the queue is stuck, the
   publish failed), or a prefill worker left the registry while the attempt waited
   (deregistered, or its heartbeat TTL expired after a crash): fall back to a local
   prefill on fresh pages (the landing pages stay quarantined until the lease has
   expired). Which prefill worker took a job is not known before its KVReady, so
   any prefill worker leaving fails every waiting attempt: with several workers a
   crash costs a few redundant local prefills, never a wrong token (stale KVReady
   are ignored, landing pages stay fenced);
6. stream chunks; a client that goes away aborts the request (pages freed, landing
   pages quarantined).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.output import RequestOutput
from splitserve.engine.page_allocator import page_hashes
from splitserve.engine.remote_prefill import LandingPlan
from splitserve.engine.sampling import SamplingParams
from splitserve.queue.errors import MalformedMessage, PublishFailed
from splitserve.queue.messages import decode_kv_ready
from splitserve.queue.subjects import STREAM_PREFILL
from splitserve.queue.work_queue import publish_job
from splitserve.routing.offload import should_offload_prefill
from splitserve.rpc.jobs_pb2 import PrefillJob
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.worker.core import WorkerCore, logged_task
from splitserve.worker.ingress import (
    GenerateRequest,
    GenerationChunk,
    Timing,
    check_request_id,
    tokenize,
)

log = logging.getLogger(__name__)

_QUEUE_DEPTH_POLL_S = 0.25


@dataclass
class _Waiting:
    attempt: int
    kv_ready: asyncio.Future[int]  # resolves to the first token


class PrefillWorkerGone(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"prefill worker {worker_id} left the registry")


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
        self.prefill_queue_depth = 0
        self._waiting: dict[str, _Waiting] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [logged_task(self._receive_notifications(), "kv-ready receiver"),
                       logged_task(self._poll_queue_depth(), "queue depth poller"),
                       logged_task(self._watch_prefill_workers(), "prefill worker watch")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def num_in_flight(self) -> int:
        engine = self.engine.engine
        return len(engine.scheduler.running) + len(engine.scheduler.waiting) + len(self._waiting)

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
        decode_load = len(engine.scheduler.running) / engine.config.max_num_seqs
        # The broker's count lags by up to one poll; our own waiting jobs are exact.
        queue_depth = max(self.prefill_queue_depth, len(self._waiting))
        remote = should_offload_prefill(self.core.config.routing, effective_len,
                                        queue_depth, decode_load, request.priority)
        stream = self.engine.open_stream(request_id)
        finished = False
        prefill, num_attempts = "local", 1
        try:
            outcome = "none"
            if remote:
                outcome = await self._remote_prefill(request_id, prompt, request)
            if outcome == "remote":
                prefill = "remote"
            elif outcome == "fallback":
                num_attempts = 2
            elif outcome == "none":
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

    # --- remote prefill -------------------------------------------------------------
    async def _remote_prefill(self, request_id: str, prompt: list[int],
                              request: GenerateRequest) -> str:
        """Try a remote prefill. "remote": the KV landed and decoding started;
        "fallback": the attempt failed and the request is queued for local prefill;
        "none": no landing pages now, the request is not in the engine."""
        lease = self.core.config.lease
        attempt = 1
        lease_s = lease.base_s + lease.per_token_ms * len(prompt) / 1e3
        deadline_unix = time.time() + lease_s
        release_at = time.monotonic() + lease_s + lease.skew_margin_s
        # Registered before the first await: concurrent decisions see this job queued.
        waiting = _Waiting(attempt, asyncio.get_running_loop().create_future())
        self._waiting[request_id] = waiting
        plan: LandingPlan | None = None
        try:
            plan = await self.engine.call(
                lambda e: e.reserve_remote(request_id, prompt, request.params, attempt,
                                           release_at))
        finally:
            if plan is None:
                self._forget(request_id)
        if plan is None:
            return "none"
        try:
            job = _prefill_job(request_id, prompt, request, plan, self.core.worker_id,
                               int(deadline_unix * 1e9))
            assert self.core.broker is not None
            await publish_job(self.core.broker.js, job, retry_for_s=lease_s / 4)
            first_token = await asyncio.wait_for(waiting.kv_ready,
                                                 timeout=deadline_unix - time.time())
            out = await self.engine.call(
                lambda e: e.accept_remote(request_id, attempt, first_token), dispatch=True)
            if out is not None:
                self.core.counters.num_remote_prefills += 1
                return "remote"
            reason = "KVReady rejected"
        except TimeoutError:
            reason = f"no KVReady within the {lease_s:.1f} s lease"
        except PublishFailed as exc:
            reason = f"publish failed: {exc}"
        except PrefillWorkerGone as exc:
            reason = str(exc)
        finally:
            self._forget(request_id)
        log.warning("request %s attempt %d: %s; prefilling locally (landing pages %s "
                    "quarantined)", request_id, attempt, reason, plan.landing_page_ids)
        await self.engine.call(lambda e: e.fallback_remote(request_id))
        self.core.counters.num_fallbacks += 1
        self.core.counters.num_local_prefills += 1
        return "fallback"

    def _forget(self, request_id: str) -> None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None and waiting.kv_ready.done() and not waiting.kv_ready.cancelled():
            waiting.kv_ready.exception()  # retrieved: a PrefillWorkerGone nobody awaited

    async def _receive_notifications(self) -> None:
        agent = self.core.agent
        assert agent is not None
        while True:
            for peer, payload in await agent.wait_notifications(timeout_s=1.0):
                try:
                    ready = decode_kv_ready(payload)
                except MalformedMessage as exc:
                    log.warning("malformed notification from %s: %s", peer, exc)
                    continue
                waiting = self._waiting.get(ready.request_id)
                if waiting is None or waiting.attempt != ready.attempt or waiting.kv_ready.done():
                    self.core.counters.num_stale_notifications += 1
                    log.info("request %s attempt %d: stale KVReady from %s ignored",
                             ready.request_id, ready.attempt, ready.prefill_worker_id)
                    continue
                waiting.kv_ready.set_result(ready.first_token)

    async def _watch_prefill_workers(self) -> None:
        while True:  # a watch can end with the broker; start a new one
            try:
                await self._watch_registry_once()
            except Exception as exc:  # noqa: BLE001 (the lease still bounds every wait)
                log.warning("registry watch failed (%r); retrying in 1 s", exc)
            await asyncio.sleep(1.0)

    async def _watch_registry_once(self) -> None:
        registry = self.core.registry
        assert registry is not None
        prefill_ids: set[str] = set()
        async for worker_id, data in registry.watch():
            if data is not None:
                if WorkerDescriptor.FromString(data).role == "prefill":
                    prefill_ids.add(worker_id)
            elif worker_id in prefill_ids:
                prefill_ids.discard(worker_id)
                for waiting in self._waiting.values():
                    if not waiting.kv_ready.done():
                        waiting.kv_ready.set_exception(PrefillWorkerGone(worker_id))

    async def _poll_queue_depth(self) -> None:
        assert self.core.broker is not None
        while True:
            try:
                info = await self.core.broker.js.stream_info(STREAM_PREFILL)
                self.prefill_queue_depth = int(info.state.messages)
            except Exception as exc:  # noqa: BLE001 (broker down: treat the queue as full)
                self.prefill_queue_depth = 1 << 30
                log.debug("prefill queue depth unavailable: %r", exc)
            await asyncio.sleep(_QUEUE_DEPTH_POLL_S)


def _prefill_job(request_id: str, prompt: list[int], request: GenerateRequest,
                 plan: LandingPlan, worker_id: str, deadline_unix_ns: int) -> PrefillJob:
    p: SamplingParams = request.params
    sampling = PrefillJob.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=p.max_tokens,
        stop_token_ids=list(p.stop_token_ids))
    if p.seed is not None:
        sampling.seed = p.seed
    return PrefillJob(
        request_id=request_id, attempt=plan.attempt, token_ids=prompt, sampling=sampling,
        priority=request.priority, dest_worker_id=worker_id,
        dest_page_ids=plan.landing_page_ids, num_cached_tokens=plan.num_cached_tokens,
        lease_deadline_unix_ns=deadline_unix_ns)
