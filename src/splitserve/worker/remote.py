"""The decode worker's side of remote prefill: attempts, leases, KVReady, retries.

Life cycle of one remote prefill:
1. attempt 1: reserve landing pages (cached prefix + the rest of the prompt) and
   publish a `PrefillJob` (Msg-Id request:attempt) whose lease deadline bounds it;
2. the `KVReady` of the current attempt arrives in time: the engine copies the
   prompt's partial last page and starts decoding after the first token;
3. no KVReady by the deadline, a publish failure, a rejected KVReady, or a prefill
   worker leaving the registry while the attempt waits (deregistered, or its TTL
   expired after a crash): the attempt has failed. Its landing pages stay
   quarantined until its lease has expired (the fence invariant), then:
   - a new attempt on *fresh* landing pages, re-published, when attempts remain
     (`routing.max_remote_attempts`), a prefill worker is registered, the broker
     took the last publish and the offload policy still says remote;
   - otherwise a local prefill in this worker's engine.
Which prefill worker took a job is not known before its KVReady, so any prefill
worker leaving fails every waiting attempt: with several workers a crash costs a few
redundant attempts, never a wrong token (stale KVReady are ignored, pages fenced).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.llm_engine import Engine
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
from splitserve.worker.ingress import GenerateRequest

log = logging.getLogger(__name__)

_QUEUE_DEPTH_POLL_S = 0.25


class PrefillWorkerGone(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"prefill worker {worker_id} left the registry")


@dataclass
class _Waiting:
    attempt: int
    kv_ready: asyncio.Future[int]  # resolves to the first token


@dataclass(frozen=True)
class RemoteOutcome:
    """prefill: "remote" (decoding started), "local" (queued for a local prefill
    after failed attempts) or "none" (no landing pages now; not in the engine)."""

    prefill: str
    num_attempts: int


class RemotePrefillClient:
    def __init__(self, core: WorkerCore, engine: AsyncEngine) -> None:
        self.core = core
        self.engine = engine
        self.prefill_queue_depth = 0  # jobs queued or in progress, polled from the broker
        self.live_prefill_ids: set[str] = set()  # from the registry watch
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
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_depth(self) -> int:
        """The broker's count lags by up to one poll; our own waiting jobs are exact."""
        return max(self.prefill_queue_depth, len(self._waiting))

    @property
    def decode_load(self) -> float:
        """Running sequences / max_num_seqs of this worker's engine."""
        engine = self.engine.engine
        return len(engine.scheduler.running) / engine.config.max_num_seqs

    def should_offload(self, effective_len: int, priority: str) -> bool:
        return should_offload_prefill(self.core.config.routing, effective_len,
                                      self.queue_depth, self.decode_load, priority)

    # --- attempts --------------------------------------------------------------------
    async def prefill(self, request_id: str, prompt: list[int], request: GenerateRequest,
                      effective_len: int) -> RemoteOutcome:
        attempt = 1
        plan, waiting, deadline_unix = await self._reserve(request_id, attempt, prompt,
                                                           request.params)
        if plan is None:
            return RemoteOutcome("none", 0)
        while True:
            reason, may_retry = await self._run_attempt(request_id, prompt, request, plan,
                                                        deadline_unix, waiting)
            if reason is None:
                self.core.counters.num_remote_prefills += 1
                return RemoteOutcome("remote", attempt)
            self.core.counters.num_fallbacks += 1
            if may_retry and self._may_retry(attempt, effective_len, request.priority):
                plan, waiting, deadline_unix = await self._reserve(request_id, attempt + 1,
                                                                   prompt, request.params)
                if plan is not None:
                    attempt += 1
                    log.warning("request %s attempt %d failed: %s; re-published as attempt "
                                "%d on landing pages %s", request_id, attempt - 1, reason,
                                attempt, plan.landing_page_ids)
                    continue
                # retry_remote found no room for new landing pages: queued locally
            else:
                await self.engine.call(lambda e: e.fallback_remote(request_id))
            log.warning("request %s attempt %d failed: %s; prefilling locally (earlier "
                        "landing pages quarantined)", request_id, attempt, reason)
            self.core.counters.num_local_prefills += 1
            return RemoteOutcome("local", attempt + 1)

    async def _reserve(self, request_id: str, attempt: int, prompt: list[int],
                       params: SamplingParams) -> tuple[LandingPlan | None, _Waiting, float]:
        """Landing pages for `attempt` under a fresh lease (attempt 1 reserves them, a
        later one retries on fresh pages): (plan or None, where its KVReady will arrive,
        unix lease deadline). The attempt counts as queued from before the first
        await, so concurrent offload decisions see it."""
        waiting = self._register(request_id, attempt)
        release_at, deadline_unix = self._lease(prompt)

        def reserve(engine: Engine) -> LandingPlan | None:
            if attempt == 1:
                return engine.reserve_remote(request_id, prompt, params, attempt, release_at)
            return engine.retry_remote(request_id, attempt, release_at)

        plan: LandingPlan | None = None
        try:
            plan = await self.engine.call(reserve)
        finally:
            if plan is None:  # no room, or cancelled (the client went away)
                self._forget(request_id)
        return plan, waiting, deadline_unix

    async def _run_attempt(self, request_id: str, prompt: list[int], request: GenerateRequest,
                           plan: LandingPlan, deadline_unix: float, waiting: _Waiting
                           ) -> tuple[str | None, bool]:
        """Publish one attempt and wait for its KVReady. (None, _) when decoding
        started; otherwise (why it failed, whether a new remote attempt makes sense)."""
        try:
            job = _prefill_job(request_id, prompt, request, plan, self.core.worker_id,
                               int(deadline_unix * 1e9))
            assert self.core.broker is not None
            lease_s = deadline_unix - time.time()
            await publish_job(self.core.broker.js, job, retry_for_s=lease_s / 4)
            first_token = await asyncio.wait_for(waiting.kv_ready,
                                                 timeout=deadline_unix - time.time())
            out = await self.engine.call(
                lambda e: e.accept_remote(request_id, plan.attempt, first_token),
                dispatch=True)
            return (None, False) if out is not None else ("KVReady rejected", True)
        except TimeoutError:
            return "no KVReady within the lease", True
        except PublishFailed as exc:
            return f"publish failed: {exc}", False  # the broker is in trouble: stay local
        except PrefillWorkerGone as exc:
            return str(exc), True
        finally:
            self._forget(request_id)

    def _may_retry(self, attempt: int, effective_len: int, priority: str) -> bool:
        if attempt >= self.core.config.routing.max_remote_attempts or not self.live_prefill_ids:
            return False
        return self.should_offload(effective_len, priority)

    def _lease(self, prompt: list[int]) -> tuple[float, float]:
        """(monotonic time the landing pages may be reused, unix lease deadline)."""
        lease = self.core.config.lease
        lease_s = lease.base_s + lease.per_token_ms * len(prompt) / 1e3
        return time.monotonic() + lease_s + lease.skew_margin_s, time.time() + lease_s

    def _register(self, request_id: str, attempt: int) -> _Waiting:
        waiting = _Waiting(attempt, asyncio.get_running_loop().create_future())
        self._waiting[request_id] = waiting
        return waiting

    def _forget(self, request_id: str) -> None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None and waiting.kv_ready.done() and not waiting.kv_ready.cancelled():
            waiting.kv_ready.exception()  # retrieved: a PrefillWorkerGone nobody awaited

    # --- background tasks ----------------------------------------------------------------
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
        registry, broker = self.core.registry, self.core.broker
        assert registry is not None and broker is not None
        async for event in registry.watch_forever(broker):
            if event is None:  # restarted: a fresh snapshot follows
                self.live_prefill_ids.clear()
                continue
            worker_id, data = event
            if data is not None:
                if WorkerDescriptor.FromString(data).role == "prefill":
                    self.live_prefill_ids.add(worker_id)
            elif worker_id in self.live_prefill_ids:
                self.live_prefill_ids.discard(worker_id)
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
