"""Prefill role: pull jobs, prefill in batches, write KV pages by id, then ack.

Life cycle of a job:
1. pulled from this worker's direct consumer or a shared one (by priority), in a
   short adaptive batching window;
2. lease checked: a job whose deadline (minus the skew margin) has passed is
   `term`-ed, never processed — the decode worker may already reuse its pages;
3. the destination's `WorkerDescriptor` is looked up once and cached (NIXL connect);
4. the prompt runs in this worker's engine (batched with the other jobs), which
   samples the first token and keeps the pages;
5. lease checked again, then one WRITE per contiguous page run carrying a `KVReady`
   notification that arrives after the data; `in_progress` heartbeats meanwhile;
6. `ack` after the transfer completed; `nak` with delay for a retryable failure
   while the lease lasts, `term` otherwise. Pages go back to the prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from splitserve.config.daemon import PrefillRoleConfig
from splitserve.engine.sampling import SamplingParams
from splitserve.errors import SplitserveError
from splitserve.queue.messages import encode_kv_ready
from splitserve.queue.streams import (
    direct_consumer_config,
    ensure_consumer,
    shared_consumer_config,
)
from splitserve.queue.work_queue import JobConsumer, JobDelivery
from splitserve.rpc.jobs_pb2 import KVReady, PrefillJob
from splitserve.transfer.errors import TransferError
from splitserve.worker.core import WorkerCore, logged_task

log = logging.getLogger(__name__)

_IDLE_FETCH_S = 0.5


class PrefillService:
    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self._consumers: list[JobConsumer] = []
        self._task: asyncio.Task[None] | None = None
        self._accepting = True
        self.num_in_flight = 0

    # Read from the core at use time: a config reload swaps `core.config`.
    @property
    def config(self) -> PrefillRoleConfig:
        return self.core.config.prefill

    @property
    def margin_s(self) -> float:
        return self.core.config.lease.skew_margin_s

    async def start(self) -> None:
        assert self.core.broker is not None
        js = self.core.broker.js
        settings = self.core.queue_settings
        direct = direct_consumer_config(self.core.worker_id, settings)
        await ensure_consumer(js, direct)
        configs = [direct] + [shared_consumer_config(p, settings) for p in settings.priorities]
        self._consumers = [await JobConsumer.bind(js, c) for c in configs]
        self._task = logged_task(self._run(), "prefill job loop")

    async def drain(self) -> None:
        """Stop pulling jobs; those in flight finish."""
        self._accepting = False

    def resume(self) -> None:
        self._accepting = True

    async def stop(self) -> None:
        self._accepting = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for consumer in self._consumers:
            await consumer.close()

    async def _run(self) -> None:
        while True:
            if not self._accepting:
                await asyncio.sleep(0.1)
                continue
            batch = await self._fetch()
            if batch:
                await asyncio.gather(*(self._handle(d) for d in batch))

    async def _fetch(self) -> list[JobDelivery]:
        """Direct jobs first, then shared ones by priority; block only when idle."""
        batch: list[JobDelivery] = []
        window_s = self.config.batch_window_ms / 1e3
        for consumer in self._consumers:
            room = self.config.max_batch_jobs - len(batch)
            if room <= 0:
                break
            batch += await consumer.fetch(room, timeout_s=0.01)
        if not batch:
            # Nothing waiting: long-poll the shared normal consumer set, then top up.
            for consumer in self._consumers[1:]:
                batch += await consumer.fetch_batch(self.config.max_batch_jobs, _IDLE_FETCH_S /
                                                    len(self._consumers), window_s)
                if batch:
                    break
        return batch

    async def _handle(self, delivery: JobDelivery) -> None:
        job = delivery.job
        tag = f"{job.request_id}:{job.attempt}"
        if delivery.lease_remaining_s(self.margin_s) <= 0:
            self.core.counters.num_expired_jobs += 1
            log.info("job %s: lease expired before prefill; terminated", tag)
            await delivery.term()
            return
        self.num_in_flight += 1
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        local_id = f"{tag}:{delivery.stream_seq}"  # unique per delivery
        engine = self.core.async_engine
        assert engine is not None
        try:
            peer_id = await self._connect(job.dest_worker_id)
            first_token = await self._prefill(local_id, job)
            await self._transfer(delivery, peer_id, local_id, first_token)
        except _Retry as exc:
            if delivery.lease_remaining_s(self.margin_s) > self.config.nak_delay_s:
                log.warning("job %s: %s; retrying later", tag, exc)
                await delivery.nak(self.config.nak_delay_s)
            else:
                log.warning("job %s: %s; lease too short to retry, terminated", tag, exc)
                await delivery.term()
        except SplitserveError as exc:  # the job itself is bad (validation): never retry
            log.warning("job %s: rejected: %s", tag, exc)
            await delivery.term()
        except Exception:  # a bug must cost one job, not the worker
            log.exception("job %s: failed; terminated", tag)
            await delivery.term()
        finally:
            heartbeat.cancel()
            self.num_in_flight -= 1
            if engine.is_running:
                engine.call(lambda e: e.release_held(local_id))

    async def _connect(self, worker_id: str) -> str:
        agent = self.core.agent
        assert agent is not None
        descriptor = await self.core.peer_descriptor(worker_id)
        if descriptor is None:
            raise _Retry(f"destination worker {worker_id} is not registered")
        return agent.connect(descriptor)  # cached per peer; refused on mismatch

    async def _prefill(self, local_id: str, job: PrefillJob) -> int:
        engine = self.core.async_engine
        assert engine is not None
        s = job.sampling
        params = SamplingParams(max_tokens=1, temperature=s.temperature, top_p=s.top_p,
                                top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
                                ignore_eos=True)
        first_token = -1
        async for out in engine.generate(local_id, list(job.token_ids), params, hold_pages=True):
            first_token = out.new_token_ids[0] if out.new_token_ids else first_token
        # generate() ends when the request finishes; its pages stay held (hold_pages)
        return first_token

    async def _transfer(self, delivery: JobDelivery, peer_id: str, local_id: str,
                        first_token: int) -> None:
        job = delivery.job
        engine, agent = self.core.async_engine, self.core.agent
        assert engine is not None and agent is not None
        ps = engine.engine.config.page_size
        pages = await engine.call(lambda e: e.held_pages(local_id))
        local_pages = pages[job.num_cached_tokens // ps: -(-len(job.token_ids) // ps)]
        remaining_s = delivery.lease_remaining_s(self.margin_s)
        if remaining_s <= 0:  # the fence: never post a write after the lease
            self.core.counters.num_expired_jobs += 1
            log.info("job %s:%d: lease expired during prefill; terminated", job.request_id,
                     job.attempt)
            await delivery.term()
            return
        ready = KVReady(request_id=job.request_id, attempt=job.attempt, first_token=first_token,
                        prefill_worker_id=self.core.worker_id,
                        prefill_end_unix_ns=time.time_ns())
        try:
            await agent.write_pages_async(
                peer_id, local_pages, list(job.dest_page_ids), encode_kv_ready(ready),
                job.request_id, timeout_s=min(self.config.transfer_timeout_s, remaining_s))
        except TransferError as exc:
            raise _Retry(f"transfer failed: {exc}") from exc
        self.core.counters.num_remote_prefills += 1
        await delivery.ack()
        log.info("job %s:%d: %d tokens prefilled, pages %s → %s on %s", job.request_id,
                 job.attempt, len(job.token_ids), local_pages, list(job.dest_page_ids), peer_id)

    async def _heartbeat(self, delivery: JobDelivery) -> None:
        interval_s = self.core.queue_settings.ack_wait_s / 3
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(interval_s)
                await delivery.in_progress()


class _Retry(Exception):
    """A failure worth another delivery while the lease lasts."""
