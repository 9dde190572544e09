"""The decode worker's side of remote prefill: attempts, leases, KVReady, retries.

Life cycle of one remote prefill (the decisions are `routing.attempts.RemoteAttempts`;
this module carries them out):
1. attempt 1: reserve landing pages (cached prefix + the rest of the prompt + the
   page that will own the partial last one) in the engine call that admitted the
   request (`reserve_rule`; mid-step: no wait for the engine's step in progress)
   and publish a `PrefillJob` naming this worker's incarnation, under a lease sized
   from the pool's measured prefill rate (worker/leases.py); Msg-Id = <internal
   id>:<attempt> (the internal id is ours; the caller's is a label). While it waits, a
   prefill worker may renew the lease (granted before the deadline, up to the cap;
   the pages' release moves first) or decline the job (the attempt fails at once);
2. the `KVReady` of the current attempt arrives in time, for this incarnation: the
   engine checks the page checksums (`kv_checksum`), copies the partial last page and
   starts decoding after the first token (mid-step: it need not wait for the step);
3. the attempt fails: no KVReady by the deadline, a refused or duplicate publish, a
   rejected KVReady, a checksum mismatch, a failed accept, or a prefill worker
   leaving the registry while the attempt waits. Its landing pages stay quarantined
   until its lease has expired (the fence invariant), then:
   - a new attempt on *fresh* landing pages, re-published, when the machine says
     RETRY (attempts remain, a usable prefill worker is registered, the policy
     still says remote, the failure is not the broker's);
   - otherwise a local prefill in this worker's engine.
Which prefill worker took a job is not known before its KVReady, so any prefill
worker leaving fails every waiting attempt: with several workers a crash costs a few
redundant attempts, never a wrong token (stale KVReady are ignored, pages fenced).
Prefill workers whose clock is provably off by more than the skew margin (measured
from KVReady timestamps) get no jobs: jobs then go to a healthy worker's direct
subject, or stay local.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.llm_engine import Engine
from splitserve.engine.remote_prefill import AcceptRefusal, LandingPlan
from splitserve.ingress import GenerateRequest
from splitserve.queue.errors import DuplicateJob, MalformedMessage, PublishFailed
from splitserve.queue.messages import decode_kv_ready, job_sampling
from splitserve.queue.registry import parse_descriptor
from splitserve.queue.work_queue import publish_job
from splitserve.routing.attempts import Failure, Next, RemoteAttempts, RetryContext
from splitserve.routing.clock import ClockOffsets
from splitserve.routing.offload import OffloadRule
from splitserve.rpc.jobs_pb2 import KVReady, LeaseReply, LeaseRequest, PrefillJob
from splitserve.tasks import logged_task, stop_tasks
from splitserve.transfer.checksum import pages_intact
from splitserve.worker.core import WorkerCore
from splitserve.worker.leases import LeaseDesk, PrefillDeclined
from splitserve.worker.policy import PolicyView
from splitserve.worker.queue_depth import QueueDepth, broker_depth

log = logging.getLogger(__name__)


class PrefillPath(Enum):
    REMOTE = "remote"  # decoding started on landed pages
    LOCAL = "local"  # queued for a local prefill after failed attempts
    NONE = "none"  # no room for landing pages now; not in the engine


class PrefillWorkerGone(Exception):
    def __init__(self, worker_id: str) -> None:
        super().__init__(f"prefill worker {worker_id} left the registry")


@dataclass
class _Waiting:
    attempts: RemoteAttempts
    kv_ready: asyncio.Future[KVReady]
    publish_unix_ns: int = 0
    publish_s: float = 0.0  # time.monotonic() of the publish


@dataclass(frozen=True)
class RemoteOutcome:
    path: PrefillPath
    num_attempts: int
    queue_s: float = 0.0  # landed: publish to the prefill worker's dequeue
    prefill_s: float = 0.0  # landed: dequeue to accepted (prefill, transfer, notification)


@dataclass(frozen=True)
class RemoteStart:
    """What admission did for a remote prefill, on the engine thread: the first
    attempt, and its landing pages (None: no room for them now)."""

    effective_len: int  # prompt tokens not in the prefix cache
    attempts: RemoteAttempts
    plan: LandingPlan | None


@dataclass(frozen=True)
class _Landed:
    """The attempt's KV landed and decoding started."""

    queue_s: float
    prefill_s: float


class RemotePrefillClient:
    def __init__(self, core: WorkerCore, engine: AsyncEngine) -> None:
        self.core = core
        self.engine = engine
        self.depth = QueueDepth(broker_depth(core))
        self.live_prefill_ids: set[str] = set()  # from the registry watch
        self._incarnations: dict[str, str] = {}  # prefill worker → registered incarnation
        self.clocks = ClockOffsets()
        self.desk = LeaseDesk(core)
        self.policy = PolicyView(lambda: core.config.routing)  # + splitserve-policy
        self._waiting: dict[str, _Waiting] = {}  # internal request id → its attempt
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [logged_task(self._receive_notifications(), "kv-ready receiver"),
                       logged_task(self.depth.poll_forever(), "queue depth poller"),
                       logged_task(self._watch_prefill_workers(), "prefill worker watch")]
        await self.desk.start(self._on_lease)
        await self.policy.start(self.core.broker, self.core.bucket_settings)

    async def stop(self) -> None:
        await stop_tasks(*self._tasks)
        await self.desk.stop()
        await self.policy.stop()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_depth(self) -> int:
        """The broker's count lags by up to one poll; our own waiting jobs are exact."""
        return max(self.depth.value, len(self._waiting))

    def usable_prefill_ids(self) -> list[str]:
        """Registered prefill workers whose clock is not provably off by the margin."""
        margin_s = self.core.config.lease.skew_margin_s
        return sorted(w for w in self.live_prefill_ids if not self.clocks.is_excluded(w, margin_s))

    def offload_rule(self, priority: str) -> OffloadRule:
        """This moment's routing policy, queue depth and prefill workers, for the engine
        thread to complete at admission. Never remote while no usable prefill worker
        is registered (the job would wait out a whole lease for nobody)."""
        return OffloadRule(self.policy.routing, self.queue_depth,
                           bool(self.usable_prefill_ids()), priority)

    def reserve_rule(self, request_id: str, prompt: list[int], request: GenerateRequest
                     ) -> Callable[[Engine, int], RemoteStart]:
        """`(engine, effective prompt length) -> RemoteStart`: attempt 1 and its landing
        pages, for the engine thread to run in the admission call. The lease is sized
        from this moment's measured rates and queue depth, and its clock starts now
        (before the call waits for the step in progress), as the release of the pages
        derives from it."""
        lease_for = self.desk.lease_rule(self.queue_depth, len(self.usable_prefill_ids()))
        max_attempts = self.policy.routing.max_remote_attempts
        margin_s, now = self.core.config.lease.skew_margin_s, time.monotonic()

        def reserve(e: Engine, effective_len: int) -> RemoteStart:
            attempts = RemoteAttempts.start(max_attempts, now, lease_for(effective_len))
            plan = e.reserve_remote(request_id, prompt, request.params, 1,
                                    attempts.deadline_s + margin_s, request.priority)
            return RemoteStart(effective_len, attempts, plan)

        return reserve

    def should_offload(self, effective_len: int, priority: str) -> bool:
        """The offload rule on the engine's latest snapshot."""
        stats = self.engine.stats
        return self.offload_rule(priority)(effective_len, stats.decode_load,
                                           stats.num_remote_pending)

    # --- attempts --------------------------------------------------------------------
    async def prefill(self, request_id: str, prompt: list[int], request: GenerateRequest,
                      start: RemoteStart) -> RemoteOutcome:
        """`request_id` is the internal id (engine sequence, job, KVReady); `start` is
        what `reserve_rule` did at admission."""
        # One clock reading per attempt: the job's deadline (deadline_s) and the landing
        # pages' release (release_at = deadline_s + margin) derive from it, so the
        # quarantine always outlasts the lease by the full margin.
        attempts, plan, effective_len = start.attempts, start.plan, start.effective_len
        if plan is None:
            return RemoteOutcome(PrefillPath.NONE, 0)
        self._waiting[request_id] = _Waiting(attempts,
                                             asyncio.get_running_loop().create_future())
        while True:
            failure = await self._run_attempt(request_id, prompt, request, plan)
            if isinstance(failure, _Landed):  # not a failure: the KV landed
                attempts.accepted()
                self.core.counters.num_remote_prefills += 1
                return RemoteOutcome(PrefillPath.REMOTE, attempts.attempt, failure.queue_s,
                                     failure.prefill_s)
            self.core.counters.num_fallbacks += 1
            context = RetryContext(bool(self.usable_prefill_ids()),
                                   self.should_offload(effective_len, request.priority))
            if attempts.failed(failure, context) is Next.RETRY:
                lease_s, now = self._lease_s(effective_len), time.monotonic()
                release_at = now + lease_s + self.core.config.lease.skew_margin_s
                attempt = attempts.attempt + 1
                plan = await self._reserve(request_id, attempts, partial(
                    Engine.retry_remote, request_id=request_id, attempt=attempt,
                    release_at=release_at))
                if plan is not None:
                    attempts.reserved(now, lease_s)
                    log.warning("request %s (%s) attempt %d failed: %s; re-published as "
                                "attempt %d on landing pages %s", request_id, request.request_id,
                                attempt - 1, failure.value, attempt, plan.landing_page_ids)
                    continue
                attempts.no_room()  # retry_remote queued a local prefill instead
            else:
                await self.engine.call(lambda e: e.fallback_remote(request_id))
            log.warning("request %s (%s) attempt %d failed: %s; prefilling locally (landing "
                        "pages quarantined)", request_id, request.request_id, attempts.attempt,
                        failure.value)
            self.core.counters.num_local_prefills += 1
            return RemoteOutcome(PrefillPath.LOCAL, attempts.num_attempts)

    async def _reserve(self, request_id: str, attempts: RemoteAttempts,
                       reserve: Callable[[Engine], LandingPlan | None]
                       ) -> LandingPlan | None:
        """Landing pages for the next attempt (None: no room, nothing pending). The
        attempt counts as queued from before the first await, so concurrent offload
        decisions see it."""
        waiting = _Waiting(attempts, asyncio.get_running_loop().create_future())
        self._waiting[request_id] = waiting
        plan: LandingPlan | None = None
        try:
            plan = await self.engine.call(reserve)
        finally:
            if plan is None:  # no room, or cancelled (the client went away)
                self._forget(request_id)
        return plan

    async def _run_attempt(self, request_id: str, prompt: list[int], request: GenerateRequest,
                           plan: LandingPlan) -> Failure | _Landed:
        """Publish one attempt, wait for its KVReady and accept it: how long it took
        when decoding started, else why the attempt failed."""
        waiting = self._waiting[request_id]
        try:
            ready = await self._publish_and_wait(request_id, prompt, request, plan, waiting)
        except TimeoutError:
            self.core.counters.num_lease_expiries += 1
            return Failure.LEASE_EXPIRED
        except DuplicateJob:
            self.core.counters.num_duplicate_publishes += 1
            return Failure.DUPLICATE_PUBLISH
        except PublishFailed:
            return Failure.PUBLISH_FAILED
        except PrefillWorkerGone:
            return Failure.WORKER_GONE
        except PrefillDeclined as exc:
            self.core.counters.num_declined_jobs += 1
            log.info("request %s attempt %d: %s", request_id, plan.attempt, exc)
            return Failure.DECLINED
        finally:
            self._forget(request_id)
        # run on the engine thread: at accept, and again before the pages are cached
        verify = pages_intact(ready.page_checksums) if self.core.config.kv_checksum else None
        try:
            out = await self.engine.call(lambda e: e.accept_remote(
                request_id, plan.attempt, ready.first_token, verify), dispatch=True,
                mid_step=True)
        except Exception:  # the attempt fails; its pages stay fenced
            log.exception("request %s attempt %d: accepting KVReady failed", request_id,
                          plan.attempt)
            self.core.counters.num_accept_failures += 1
            return Failure.ACCEPT_FAILED
        if out is AcceptRefusal.CHECKSUM_MISMATCH:
            self.core.counters.num_checksum_failures += 1
            return Failure.CHECKSUM_MISMATCH
        if isinstance(out, AcceptRefusal):
            log.warning("request %s attempt %d: KVReady refused: %s", request_id, plan.attempt,
                        out.value)
            return Failure.REFUSED
        # The prefill worker's clock stamped the dequeue: off by up to the skew margin.
        queue_s = max(0.0, (ready.dequeue_time_unix_ns - waiting.publish_unix_ns) / 1e9)
        return _Landed(queue_s, max(0.0, time.monotonic() - waiting.publish_s - queue_s))

    async def _publish_and_wait(self, request_id: str, prompt: list[int],
                                request: GenerateRequest, plan: LandingPlan,
                                waiting: _Waiting) -> KVReady:
        lease_s = waiting.attempts.remaining_s(time.monotonic())
        waiting.publish_unix_ns, waiting.publish_s = self.core.now_unix_ns(), time.monotonic()
        job = self._job(request_id, prompt, request, plan,
                        waiting.publish_unix_ns + int(lease_s * 1e9), waiting.publish_unix_ns)
        await publish_job(self.core.broker.js, job, prefill_worker_id=self._direct_target(),
                          retry_for_s=lease_s / 4)
        self.core.counters.num_remote_attempts += 1
        log.info("request %s (%s) attempt %d: published, %d prompt tokens, lease %.2f s",
                 request_id, request.request_id, plan.attempt, len(prompt), lease_s)
        while True:  # a granted renewal moves the deadline while we wait
            remaining_s = waiting.attempts.remaining_s(time.monotonic())
            if remaining_s <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({waiting.kv_ready}, timeout=remaining_s)
            if done:
                return waiting.kv_ready.result()

    def _direct_target(self) -> str | None:
        """None (the shared subject) unless some prefill worker is excluded for clock
        skew: then one of the usable workers' direct subject."""
        usable = self.usable_prefill_ids()
        if len(usable) == len(self.live_prefill_ids) or not usable:
            return None
        return usable[len(self._waiting) % len(usable)]

    def _job(self, request_id: str, prompt: list[int], request: GenerateRequest,
             plan: LandingPlan, deadline_unix_ns: int, publish_unix_ns: int) -> PrefillJob:
        return PrefillJob(
            request_id=request_id, attempt=plan.attempt, token_ids=prompt,
            sampling=job_sampling(request.params),
            priority=request.priority, dest_worker_id=self.core.worker_id,
            dest_page_ids=plan.landing_page_ids, num_cached_tokens=plan.num_cached_tokens,
            lease_deadline_unix_ns=deadline_unix_ns, publish_time_unix_ns=publish_unix_ns,
            dest_incarnation=self.core.incarnation, label=request.request_id,
            want_checksums=self.core.config.kv_checksum)

    def _lease_s(self, effective_len: int) -> float:
        return self.desk.lease_s(effective_len, self.queue_depth,
                                 len(self.usable_prefill_ids()))

    async def _on_lease(self, request: LeaseRequest) -> LeaseReply:
        """A prefill worker asks for more time for an attempt, or declines it."""
        return await self.desk.answer(request, lambda: self._waiting.get(request.request_id),
                                      self.engine)

    def _forget(self, request_id: str) -> None:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None and waiting.kv_ready.done() and not waiting.kv_ready.cancelled():
            waiting.kv_ready.exception()  # retrieved: a PrefillWorkerGone nobody awaited

    # --- background tasks ----------------------------------------------------------------
    async def _receive_notifications(self) -> None:
        agent = self.core.agent
        while True:
            for peer, payload in await agent.wait_notifications(timeout_s=1.0):
                try:
                    self._on_kv_ready(decode_kv_ready(payload))
                except MalformedMessage as exc:
                    log.warning("malformed notification from %s: %s", peer, exc)

    def _on_kv_ready(self, ready: KVReady) -> None:
        counters = self.core.counters
        if ready.dest_incarnation != self.core.incarnation:
            counters.num_incarnation_mismatches += 1
            log.warning("request %s attempt %d: KVReady from %s for incarnation %r (ours is "
                        "%s) ignored", ready.request_id, ready.attempt, ready.prefill_worker_id,
                        ready.dest_incarnation, self.core.incarnation)
            return
        waiting = self._waiting.get(ready.request_id)
        if waiting is not None and waiting.attempts.attempt == ready.attempt:
            self.clocks.observe(ready.prefill_worker_id, waiting.publish_unix_ns,
                                ready.dequeue_time_unix_ns, ready.prefill_end_unix_ns,
                                self.core.now_unix_ns())
        if (waiting is None or waiting.kv_ready.done()
                or not waiting.attempts.kv_ready(ready.attempt, time.monotonic())):
            counters.num_stale_notifications += 1
            log.info("request %s attempt %d: stale KVReady from %s ignored",
                     ready.request_id, ready.attempt, ready.prefill_worker_id)
            return
        waiting.kv_ready.set_result(ready)

    async def _watch_prefill_workers(self) -> None:
        registry, broker = self.core.registry, self.core.broker
        async for event in registry.watch_forever(broker):
            if event is None:  # restarted: drop whoever left while we were not watching
                for worker_id in self.live_prefill_ids - await registry.live_ids():
                    self._prefill_worker_left(worker_id, gone=True)
                continue
            worker_id, data = event
            descriptor = None if data is None else parse_descriptor(worker_id, data)
            if data is not None and descriptor is None:
                continue  # a garbage entry (logged): changes nothing
            if descriptor is not None and descriptor.role == "prefill":
                self.live_prefill_ids.add(worker_id)
                if self._incarnations.get(worker_id) != descriptor.incarnation:
                    self.clocks.forget(worker_id)  # restarted: measure its clock anew
                    self._incarnations[worker_id] = descriptor.incarnation
            elif worker_id in self.live_prefill_ids:
                self._prefill_worker_left(worker_id, gone=descriptor is None)

    def _prefill_worker_left(self, worker_id: str, gone: bool) -> None:
        """A worker that switched roles (Admin.SetRole) drained first and holds no job:
        the waiting attempts' jobs stay for the other prefill workers. Gone (or no
        prefill worker left): fail them now rather than at the lease."""
        self.live_prefill_ids.discard(worker_id)
        if not gone and self.live_prefill_ids:
            return
        for waiting in self._waiting.values():
            if not waiting.kv_ready.done():
                waiting.kv_ready.set_exception(PrefillWorkerGone(worker_id))
