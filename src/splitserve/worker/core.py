"""What every worker has, whatever its role: engine, transfer agent, broker, registry.

The role (decode or prefill) is a separate object using this core, so a drained
worker can later switch roles without a second code path.

Built in two stages, each whole: `start_core(config)` starts the engine and returns the
core around it (gRPC can then serve health and admin); `core.start_messaging(address)`
registers the KV pool with NIXL, connects to the broker and registers the worker, as one
`Messaging` (agent, broker, registry). The roles start after both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from splitserve.config.daemon import WorkerConfig
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.kv_pool import KVPool
from splitserve.engine.llm_engine import Engine
from splitserve.engine.stats import EngineStats
from splitserve.queue.connection import BrokerConnection, connect
from splitserve.queue.errors import TRANSIENT_BROKER_ERRORS
from splitserve.queue.registry import WorkerRegistry, parse_descriptor
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.stats import publish_stats
from splitserve.queue.streams import ensure_messaging
from splitserve.rpc.jobs_pb2 import WorkerStats
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.tasks import logged_task, stop_tasks
from splitserve.transfer.agent import TransferAgent
from splitserve.worker.metrics import COUNTERS, RequestMetrics, WorkerState
from splitserve.worker.observer import Observer
from splitserve.worker.windows import WorkerWindows

log = logging.getLogger(__name__)

MESSAGING_SETUP_S = 60.0  # how long start-up waits for the broker's streams and buckets

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the `model_name` label of the embedded model

WorkerRole = Literal["decode", "prefill"]  # WorkerConfig.role


@dataclass
class WorkerCounters:
    """Cumulative since the worker started (Admin.GetStatus counters)."""

    num_local_prefills: int = 0
    num_remote_prefills: int = 0  # decode: accepted KVReady; prefill: jobs transferred
    num_fallbacks: int = 0
    num_rejects: int = 0
    num_finished: int = 0
    num_expired_jobs: int = 0  # prefill: terminated, lease over
    num_stale_notifications: int = 0  # decode: KVReady of an attempt no longer awaited
    num_incarnation_mismatches: int = 0  # a job or KVReady for another incarnation
    num_checksum_failures: int = 0  # decode: landed pages failed their checksums
    num_duplicate_ids: int = 0  # decode: caller request id already in flight
    num_duplicate_publishes: int = 0  # decode: the broker already had the job
    num_accept_failures: int = 0  # decode: KVReady arrived, taking the pages failed
    num_rejected_jobs: int = 0  # prefill: terminated for a permanent error
    num_clock_skew_jobs: int = 0  # prefill: terminated, our clock is behind the job's
    num_offload_local: int = 0  # decode: the offload rule kept the request local
    num_offload_remote: int = 0  # decode: ... sent it to the prefill pool
    num_remote_attempts: int = 0  # decode: jobs published
    num_lease_expiries: int = 0  # decode: attempts whose lease ran out
    num_lease_renewals: int = 0  # granted extensions (decode: given; prefill: received)
    num_declined_jobs: int = 0  # prefill: declined up front; decode: attempts declined
    num_role_switches: int = 0  # Admin.SetRole switches completed


def apply_cpu_settings(config: WorkerConfig) -> None:
    """Pin the process and size torch's thread pool (one core per worker in benchmarks)."""
    if config.cpu_affinity:
        os.sched_setaffinity(0, set(config.cpu_affinity))
    threads = config.cpu_threads or config.engine.cpu_threads or (
        len(config.cpu_affinity) if config.cpu_affinity else None)
    if threads:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Messaging:
    """The transfer agent (our KV pool, registered with NIXL), the broker connection and
    the registry, in which this worker is registered."""

    agent: TransferAgent
    broker: BrokerConnection
    registry: WorkerRegistry


async def start_core(config: WorkerConfig) -> WorkerCore:
    """Start the engine (on its thread) and the core around it; metrics served if set."""
    apply_cpu_settings(config)
    engine_config = config.engine
    if config.cpu_threads:
        engine_config = replace(engine_config, cpu_threads=config.cpu_threads)
    engine = await asyncio.to_thread(Engine.from_config, engine_config)
    if config.faults.crash_engine_after_steps:
        _crash_after(engine, config.faults.crash_engine_after_steps)
    async_engine = AsyncEngine(engine)
    await async_engine.start()
    core = WorkerCore(config, async_engine, engine.pool)
    if config.metrics_address:
        core.metrics_url = core.metrics.serve(config.metrics_address)
    return core


class WorkerCore:
    def __init__(self, config: WorkerConfig, engine: AsyncEngine, kv_pool: KVPool) -> None:
        """`engine` started; `kv_pool` its pages (what the transfer agent registers)."""
        self.config = config
        self.worker_id = config.resolved_worker_id()
        # A new one at every start: peers never write into a previous life's pages.
        self.incarnation = secrets.token_hex(16)
        self.role = config.role
        self.counters = WorkerCounters()
        self.started_s = time.monotonic()
        self.queue_settings = PrefillQueueSettings(replicas=config.nats.replicas)
        self.bucket_settings = BucketSettings(replicas=config.nats.replicas)
        self.engine = engine
        self.kv_pool = kv_pool
        self._messaging: Messaging | None = None  # start_messaging
        self._stats_task: asyncio.Task[None] | None = None
        # decode: the prefill queue's depth as last polled (set by the decode role)
        self.remote_queue_depth: Callable[[], int] = lambda: 0
        self.windows = WorkerWindows()
        self.metrics = RequestMetrics(config.engine.model or DEFAULT_MODEL_NAME,
                                      self._metrics_state)
        self.observer = Observer(self.metrics, self.windows)
        engine.stats_listeners.append(self.observer.engine_step)
        # Idle -> busy publishes at once: a planner choosing which worker to flip sees
        # this one loaded, not the idle stats of up to `stats_interval_s` ago.
        self._busy = False
        self._publish_now = asyncio.Event()
        engine.stats_listeners.append(self._on_engine_stats)
        self.metrics_url = ""

    @property
    def messaging(self) -> Messaging:
        if self._messaging is None:
            raise RuntimeError(f"worker {self.worker_id}: messaging not started "
                               "(start_messaging comes before the roles)")
        return self._messaging

    @property
    def has_messaging(self) -> bool:
        return self._messaging is not None

    @property
    def agent(self) -> TransferAgent:
        return self.messaging.agent

    @property
    def broker(self) -> BrokerConnection:
        return self.messaging.broker

    @property
    def registry(self) -> WorkerRegistry:
        return self.messaging.registry

    def apply_config(self, config: WorkerConfig) -> None:
        """Make a reloaded config current (config/reload.py): one reference swap, so a
        reader sees the old config or the new one. Only fields in
        `RELOADABLE_WORKER_FIELDS` may differ; their readers take them from here."""
        self.config = config

    async def start_messaging(self, grpc_address: str) -> None:
        """Register the pool with NIXL, connect to NATS, publish our descriptor."""
        agent = TransferAgent(self.worker_id, self.kv_pool, self.engine.info.fingerprint,
                              self.role, grpc_address,
                              fail_every=self.config.faults.fail_transfer_every)
        agent.descriptor.incarnation = self.incarnation
        broker = await connect(self.config.nats_url, name=self.worker_id,
                               auth=self.config.nats_auth)
        # A JetStream cluster still electing its leaders times out API requests for a
        # while after the nodes start: retry rather than exit (seen in fresh-clone CI).
        deadline = time.monotonic() + MESSAGING_SETUP_S
        while True:
            try:
                await ensure_messaging(broker.js, self.queue_settings, self.bucket_settings)
                break
            except TRANSIENT_BROKER_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("worker %s: broker not ready (%s: %s); retrying", self.worker_id,
                            type(exc).__name__, exc)
                await asyncio.sleep(1.0)
        registry = await WorkerRegistry.open(broker.js, self.bucket_settings)
        await registry.register(self.worker_id, agent.descriptor.SerializeToString())
        self._messaging = Messaging(agent, broker, registry)
        self._stats_task = logged_task(self._publish_stats_forever(), "stats publisher")
        log.info("worker %s (%s) registered, incarnation %s; gRPC on %s", self.worker_id,
                 self.role, self.incarnation, grpc_address)

    async def switch_role(self, role: WorkerRole) -> None:
        """Make `role` this worker's role (worker/role_switch.py, once drained): the
        config, stats subject and descriptor follow, and the descriptor is re-put in
        `splitserve-workers` now, so that peers and routers see the role at once. The
        incarnation stays: pages the decode role quarantined stay fenced in the engine
        whatever the role, so a late write can still land only in them."""
        self.role = role
        self.config = replace(self.config, role=role)
        self.agent.descriptor.role = role
        await self.registry.register(self.worker_id, self.agent.descriptor.SerializeToString())

    def now_unix_ns(self) -> int:
        """This worker's unix clock, as leases and KVReady timestamps read it (plus the
        test-only `faults.clock_offset_s`, which simulates a skewed machine)."""
        return time.time_ns() + int(self.config.faults.clock_offset_s * 1e9)

    async def peer_descriptor(self, worker_id: str) -> WorkerDescriptor | None:
        data = await self.registry.get(worker_id)
        return None if data is None else parse_descriptor(worker_id, data)

    async def stop(self) -> None:
        await stop_tasks(self._stats_task)
        m = self._messaging
        if m is not None:
            try:
                await m.registry.deregister(self.worker_id)
                await m.registry.close()
            except Exception as exc:  # noqa: BLE001 (broker may be gone; the TTL cleans up)
                log.warning("worker %s: deregistration failed: %r", self.worker_id, exc)
            await m.broker.close()
        await self.engine.stop()
        if m is not None:
            m.agent.close()

    def stats(self) -> WorkerStats:
        """The last window's measurements and the engine's latest snapshot."""
        engine = self.engine.stats
        w = self.windows.summary(time.monotonic())
        c = self.counters
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, tokens_per_s=w.tokens_per_s,
            queue_depth=engine.queue_depth, num_running=engine.num_running,
            num_kv_pages_used=engine.num_pages_used, num_kv_pages_free=engine.num_pages_free,
            num_kv_pages_quarantined=engine.num_pages_quarantined, kv_usage=engine.kv_usage,
            ttft_p50_ms=w.ttft_p50_ms, ttft_p99_ms=w.ttft_p99_ms, itl_p50_ms=w.itl_p50_ms,
            itl_p99_ms=w.itl_p99_ms, queue_p50_ms=w.queue_p50_ms, queue_p99_ms=w.queue_p99_ms,
            num_local_prefills=c.num_local_prefills, num_remote_prefills=c.num_remote_prefills,
            num_rejects=c.num_rejects, timestamp_unix_ns=time.time_ns(), window_s=w.window_s,
            prefill_rates=[WorkerStats.PrefillRate(
                min_tokens=r.min_tokens, max_tokens=r.max_tokens, tokens_per_s=r.tokens_per_s,
                num_samples=r.num_samples) for r in w.prefill_rates],
            decode_steps=[WorkerStats.DecodeStep(
                min_batch=d.min_batch, max_batch=d.max_batch, mean_ms=d.mean_ms,
                mean_context_tokens=d.mean_context_tokens, num_samples=d.num_samples)
                for d in w.decode_steps],
            transfer_bytes_per_s=w.transfer_bytes_per_s,
            prefill_tokens_per_s=w.prefill_tokens_per_s,
            prefill_rate_tokens_per_s=w.prefill_rate_tokens_per_s,
            mean_prefill_tokens=w.mean_prefill_tokens, tpot_p99_ms=w.tpot_p99_ms,
        )

    def _metrics_state(self) -> WorkerState:
        """For the metrics scrape (on the HTTP server's thread): immutable snapshot,
        plain ints."""
        counters = {name: getattr(self.counters, name) for name in COUNTERS}
        messaging = self._messaging
        transfers = messaging.agent.counters if messaging is not None else None
        return WorkerState(
            engine=self.engine.stats, counters=counters,
            remote_queue_depth=self.remote_queue_depth(),
            num_transfers=transfers.num_transfers if transfers else 0,
            num_transfer_failures=transfers.num_failures if transfers else 0, role=self.role)

    def _on_engine_stats(self, stats: EngineStats) -> None:
        busy = stats.num_unfinished > 0
        if busy and not self._busy:
            self._publish_now.set()
        self._busy = busy

    async def _publish_stats_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._publish_now.wait(), self.config.stats_interval_s)
            except TimeoutError:
                pass
            self._publish_now.clear()
            await publish_stats(self.broker.nc, self.stats())


def _crash_after(engine: Engine, num_steps: int) -> None:
    """Test-only (`faults.crash_engine_after_steps`): step N+1 raises on the engine thread."""
    step = engine.step

    def crashing_step() -> list[Any]:
        if engine.num_steps >= num_steps:
            raise RuntimeError(f"injected engine crash (test-only) after {num_steps} steps")
        return step()

    engine.step = crashing_step  # type: ignore[method-assign]
