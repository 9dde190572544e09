"""Prefill role: pull jobs, prefill in batches, write KV pages by id, then ack.

Life cycle of a job:
1. pulled from this worker's direct consumer or a shared one (by priority) whenever
   one of `max_batch_jobs` slots is free, in a short adaptive batching window; an
   idle worker long-polls every consumer at once (worker/intake.py); each job then
   runs on its own, so one slow destination never holds up the others;
2. lease checked: a job whose deadline (minus the skew margin) has passed is
   `term`-ed, never processed — the decode worker may already reuse its pages; so is
   every job of a decode worker whose clock this worker's is provably behind by more
   than the margin (dequeue time − publish time, the tightest of the last 32 jobs,
   is below −margin): its lease checks would run late;
2b. the job's work is estimated (this worker's measured prefill rate for that prompt
   length): a lease too short for it is renewed at once by the decode worker
   (`splitserve.lease.<id>`); one that cannot be renewed enough is *declined*
   (the decode worker goes on at once) instead of computed and thrown away; while
   the job runs, the lease is renewed whenever the work left would outrun it
   (worker/renewal.py). Only a granted deadline ever counts;
3. the destination's current `WorkerDescriptor` is read from the registry; a job
   for another incarnation than the registered one (the decode worker restarted,
   same id or not) is `term`-ed: its pages now belong to someone else;
4. the prompt runs in this worker's engine (batched with the other jobs), which
   samples the first token and keeps the pages;
5. lease (the latest granted deadline) and incarnation checked again, then (with
   no await in between, so nothing can reconnect the peer meanwhile) one WRITE
   per contiguous page run carrying a
   `KVReady` notification that arrives after the data, with page checksums when the
   job asks; `in_progress` heartbeats meanwhile;
6. once the transfer completed, the pages go back (to the prefix cache) and the job
   is `ack`-ed; `nak` with delay for a retryable failure while the lease lasts; `term`
   for a permanent one (a bad job, page ids outside the destination's pool) or when
   the lease is too short; the pages go back then too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import nats.errors
import torch

from splitserve.config.daemon import PrefillRoleConfig
from splitserve.engine.llm_engine import Engine
from splitserve.errors import SplitserveError
from splitserve.queue.messages import encode_kv_ready, first_token_params
from splitserve.queue.streams import (
    direct_consumer_config,
    ensure_consumer,
    shared_consumer_config,
)
from splitserve.queue.work_queue import JobConsumer, JobDelivery
from splitserve.rpc.jobs_pb2 import KVReady, PrefillJob
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.tasks import logged_task, stop_tasks
from splitserve.transfer.checksum import page_checksums
from splitserve.transfer.errors import (
    DescriptorMismatch,
    InvalidDescriptor,
    InvalidPageIds,
    TransferError,
)
from splitserve.worker.core import WorkerCore
from splitserve.worker.intake import JobIntake, hand_back
from splitserve.worker.renewal import LeaseKeeper, UpFront

log = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5  # an idle worker's long poll of its consumers
_CLOCK_WINDOW = 32  # jobs per destination kept for the clock check
# The job or the destination is wrong, not the moment: another delivery fails the same way.
_PERMANENT = (InvalidPageIds, DescriptorMismatch, InvalidDescriptor)


class PrefillService:
    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self._intake = JobIntake([], _IDLE_POLL_S)
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self._jobs: set[asyncio.Task[None]] = set()  # deliveries being handled
        self._not_fetching = asyncio.Event()  # clear while a fetch is outstanding
        self._not_fetching.set()
        self._num_jobs = 0  # jobs handled, for the test-only corrupt_page_every
        # per destination incarnation: dequeue − publish time of recent jobs (ns), an
        # upper bound of (our clock − theirs) each
        self._clock_samples: dict[str, deque[int]] = {}

    # Read from the core at use time: a config reload swaps `core.config`.
    @property
    def config(self) -> PrefillRoleConfig:
        return self.core.config.prefill

    @property
    def margin_s(self) -> float:
        return self.core.config.lease.skew_margin_s

    async def start(self) -> None:
        js = self.core.broker.js
        settings = self.core.queue_settings
        direct = direct_consumer_config(self.core.worker_id, settings)
        await ensure_consumer(js, direct)
        configs = [direct] + [shared_consumer_config(p, settings) for p in settings.priorities]
        self._intake = JobIntake([await JobConsumer.bind(js, c) for c in configs],
                                 _IDLE_POLL_S)
        self._task = logged_task(self._run(), "prefill job loop")

    @property
    def num_in_flight(self) -> int:
        """Jobs pulled and not yet settled (acked, nak-ed or terminated)."""
        return len(self._jobs)

    async def drain(self) -> None:
        """Stop pulling jobs; those in flight finish. Returns once no fetch is
        outstanding: jobs a fetch brings back after this are handed back (nak)."""
        self._accepting = False
        await self._not_fetching.wait()
        for delivery in await self._intake.settle():  # pulled, not started: not ours now
            await hand_back(delivery, "worker draining")

    def resume(self) -> None:
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        await stop_tasks(self._task)
        await self._intake.close()

    async def _run(self) -> None:
        """Keep up to `max_batch_jobs` jobs in flight; fetch as soon as a slot frees."""
        in_flight = self._jobs
        try:
            while True:
                room = self.config.max_batch_jobs - len(in_flight)
                if not self._accepting or room <= 0:
                    if in_flight:
                        await asyncio.wait(in_flight, timeout=0.1,
                                           return_when=asyncio.FIRST_COMPLETED)
                    else:
                        await asyncio.sleep(0.1)
                    continue
                self._not_fetching.clear()
                try:
                    deliveries = await self._intake.fetch(
                        room, self.config.batch_window_ms / 1e3)
                finally:
                    self._not_fetching.set()
                for delivery in deliveries:
                    if not self._accepting:  # drained while fetching: not ours to run
                        await hand_back(delivery, "worker draining")
                        continue
                    task = asyncio.create_task(self._handle(delivery))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()  # each hands its job back (_handle)

    async def _handle(self, delivery: JobDelivery) -> None:
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            # Stopped mid-job (shutdown, a role switch past its grace): hand the job back
            # now, not after AckWait, so that another prefill worker takes it in its lease.
            await hand_back(delivery, "worker stopping")
            raise

    async def _process(self, delivery: JobDelivery) -> None:
        job = delivery.job
        tag = f"{job.request_id}:{job.attempt}"
        dequeue_ns = self.core.now_unix_ns()
        behind_s = self._clock_behind_s(job, dequeue_ns)
        if behind_s > self.margin_s:
            self.core.counters.num_clock_skew_jobs += 1
            log.warning("job %s for %s: this worker's clock is at least %.3f s behind the "
                        "destination's (skew margin %.3f s); terminated", tag,
                        job.dest_worker_id, behind_s, self.margin_s)
            await delivery.term()
            return
        keeper = LeaseKeeper(self.core, job, self.margin_s)
        if keeper.remaining_s() <= 0:
            self.core.counters.num_expired_jobs += 1
            log.info("job %s: lease expired before prefill; terminated", tag)
            await delivery.term()
            return
        verdict = await keeper.up_front()  # renews at once if the lease is too short
        if verdict is not UpFront.GO:
            if verdict is UpFront.DECLINE:
                await keeper.decline()  # the decode worker goes on at once
            else:
                self.core.counters.num_expired_jobs += 1
            await delivery.term()
            return
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        renewer = asyncio.create_task(keeper.keep())
        local_id = f"{tag}:{delivery.stream_seq}"  # unique per delivery
        engine = self.core.engine
        try:
            await self._destination(job)  # refuse a stale incarnation before any work
            if hold_s := self.core.config.faults.prefill_hold_s:  # test-only: a busy machine
                await asyncio.sleep(hold_s)
            started_s = time.monotonic()
            first_token = await self._prefill(local_id, job)
            self.core.observer.job_prefilled(len(job.token_ids) - job.num_cached_tokens,
                                             time.monotonic() - started_s)
            await self._transfer(delivery, keeper, local_id, first_token, dequeue_ns)
        except _Stale as exc:
            counter = ("num_expired_jobs" if exc.expired else "num_incarnation_mismatches")
            setattr(self.core.counters, counter, getattr(self.core.counters, counter) + 1)
            log.warning("job %s (%s) for %s: %s; terminated", tag, job.label, job.dest_worker_id,
                        exc)
            await delivery.term()
        except _Retry as exc:
            if keeper.remaining_s() > self.config.nak_delay_s:
                log.warning("job %s: %s; retrying later", tag, exc)
                await delivery.nak(self.config.nak_delay_s)
            else:
                log.warning("job %s: %s; lease too short to retry, terminated", tag, exc)
                await delivery.term()
        except SplitserveError as exc:  # the job itself is bad (_PERMANENT...): never retry
            self.core.counters.num_rejected_jobs += 1
            log.warning("job %s: rejected: %s", tag, exc)
            await delivery.term()
        except Exception:  # a bug must cost one job, not the worker
            self.core.counters.num_rejected_jobs += 1
            log.exception("job %s: failed; terminated", tag)
            await delivery.term()
        finally:
            if engine.is_running:
                engine.call(lambda e: e.release_held(local_id))
            await stop_tasks(heartbeat, renewer)

    def _clock_behind_s(self, job: PrefillJob, dequeue_ns: int) -> float:
        """How far our clock is provably behind the job's decode worker (≥ 0 s): the
        job waited ≥ 0 s in the queue, so theirs − ours ≥ publish − dequeue."""
        if job.publish_time_unix_ns <= 0:
            return 0.0
        key = f"{job.dest_worker_id}/{job.dest_incarnation}"
        window = self._clock_samples.setdefault(key, deque(maxlen=_CLOCK_WINDOW))
        window.append(dequeue_ns - job.publish_time_unix_ns)
        return max(0.0, -min(window) / 1e9)

    async def _destination(self, job: PrefillJob) -> WorkerDescriptor:
        """The destination's registered descriptor, if it is the job's incarnation."""
        try:
            descriptor = await self.core.peer_descriptor(job.dest_worker_id)
        except (TimeoutError, nats.errors.Error) as exc:  # broker trouble: not the job's fault
            raise _Retry(f"registry lookup of {job.dest_worker_id} failed: {exc!r}") from exc
        if descriptor is None:
            raise _Retry(f"destination worker {job.dest_worker_id} is not registered")
        if descriptor.incarnation != job.dest_incarnation:
            raise _Stale(f"incarnation {job.dest_incarnation!r} is gone (registered: "
                         f"{descriptor.incarnation!r})")
        return descriptor

    async def _prefill(self, local_id: str, job: PrefillJob) -> int:
        engine = self.core.engine
        first_token = -1
        async for out in engine.generate(local_id, list(job.token_ids),
                                         first_token_params(job.sampling), hold_pages=True):
            first_token = out.new_token_ids[0] if out.new_token_ids else first_token
        # generate() ends when the request finishes; its pages stay held (hold_pages)
        return first_token

    async def _transfer(self, delivery: JobDelivery, keeper: LeaseKeeper, local_id: str,
                        first_token: int, dequeue_ns: int) -> None:
        job = delivery.job
        engine, agent = self.core.engine, self.core.agent
        ps = engine.info.page_size
        pages = await engine.call(lambda e: e.held_pages(local_id))
        local_pages = pages[job.num_cached_tokens // ps: -(-len(job.token_ids) // ps)]
        checksums = (await engine.call(lambda e: page_checksums(e.pool.tensor, local_pages))
                     if job.want_checksums else [])
        partial_page = local_pages[-1] if len(job.token_ids) % ps else None
        async with self._corrupted(partial_page):  # (test-only; awaits before the checks)
            descriptor = await self._destination(job)  # the decode worker may have restarted
            remaining_s = keeper.remaining_s()  # under the latest *granted* deadline
            if remaining_s <= 0:  # the fence: never post a write after the lease
                raise _Stale("lease expired during prefill", expired=True)
            ready = KVReady(request_id=job.request_id, attempt=job.attempt,
                            first_token=first_token, prefill_worker_id=self.core.worker_id,
                            dequeue_time_unix_ns=dequeue_ns,
                            prefill_end_unix_ns=self.core.now_unix_ns(),
                            dest_incarnation=job.dest_incarnation, page_checksums=checksums)
            try:
                # No await between the checks above, connect and the post inside
                # write_pages_async: the peer written to is the incarnation just checked.
                peer_id = agent.connect(descriptor)
                posted_s = time.monotonic()
                await agent.write_pages_async(
                    peer_id, local_pages, list(job.dest_page_ids), encode_kv_ready(ready),
                    job.request_id, timeout_s=min(self.config.transfer_timeout_s, remaining_s))
                self.core.observer.transfer(len(local_pages) * engine.info.page_nbytes,
                                            time.monotonic() - posted_s)
            except TransferError as exc:
                if isinstance(exc, _PERMANENT):
                    raise
                raise _Retry(f"transfer failed: {exc}") from exc
        # The pages are written: free them now, not after the ack, which may retry for
        # seconds through a broker election (the job keeps only its slot meanwhile).
        engine.call(lambda e: e.release_held(local_id))
        self.core.counters.num_remote_prefills += 1
        if delay_s := self.core.config.faults.ack_delay_s:  # test-only: a slow ack
            await asyncio.sleep(delay_s)
        await delivery.ack()
        log.info("job %s:%d (%s): %d tokens prefilled, pages %s → %s on %s", job.request_id,
                 job.attempt, job.label, len(job.token_ids), local_pages,
                 list(job.dest_page_ids), peer_id)

    @contextlib.asynccontextmanager
    async def _corrupted(self, page_id: int | None) -> AsyncIterator[None]:
        """Test-only (`faults.corrupt_page_every`): on every N-th write whose prompt ends
        inside a page, flip one byte of that partial page after its checksum, and
        restore it once written. A partial page is never in this worker's prefix cache,
        so no other job reads the flipped byte."""
        every = self.core.config.faults.corrupt_page_every
        engine = self.core.engine
        if not every or page_id is None:
            yield
            return
        self._num_jobs += 1
        if self._num_jobs % every:
            yield
            return

        def flip(e: Engine) -> None:  # on the engine thread
            data = e.pool.tensor[page_id].view(-1).view(torch.uint8)
            data[0] ^= 0xFF

        await engine.call(flip)
        try:
            yield
        finally:
            if engine.is_running:
                await engine.call(flip)

    async def _heartbeat(self, delivery: JobDelivery) -> None:
        interval_s = self.core.queue_settings.ack_wait_s / 3
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval_s)
                await delivery.in_progress()


class _Retry(Exception):
    """A failure worth another delivery while the lease lasts."""


class _Stale(Exception):
    """The job may no longer be written: its lease is over, or its destination's
    incarnation is gone. Terminated, never retried (the fence invariant)."""

    def __init__(self, reason: str, expired: bool = False) -> None:
        super().__init__(reason)
        self.expired = expired
