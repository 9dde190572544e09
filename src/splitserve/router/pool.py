"""The decode workers a router can send requests to, and which one gets the next.

Life cycle of a backend (one decode worker):
1. It appears in `splitserve-workers` (registry watch): a channel to its gRPC
   address is opened and its health is watched (`grpc.health.v1.Health/Watch` of the
   Generation service). It gets traffic only while that says SERVING.
2. Its `WorkerStats` (`splitserve.stats.decode.<id>`, about once a second) give its
   queue depth and KV occupancy; stats older than `stats_max_age_s` are ignored and
   the router's own count of requests it has open there is all that is left.
3. A call that fails with UNAVAILABLE (draining, stopping, gone) takes it out of the
   choice for `unavailable_backoff_s`, or until its health says SERVING again.
   A frozen worker (a stopped process, a hung host: its TCP still up) answers no
   HTTP/2 keepalive ping (every `keepalive_s`, `keepalive_timeout_s` to answer): its
   connection is dropped, so its health watch and its open calls end UNAVAILABLE
   (step 3 above; forward.py retries a call that had no token yet elsewhere), and
   the channel reconnects once it answers again.
4. It leaves the registry (clean stop or TTL expiry): its channel is closed; calls
   still open on it end with UNAVAILABLE (forward.py: grpc cancels them).
A new incarnation under the same worker id replaces the backend.

`choose` scores the eligible backends with `load_cost` (lowest wins; ties go round
robin): their load, minus what they hold of the prompt's prefix (prefix_index.py: the
workers' `KVCacheEvents` on `splitserve.kv.*`, and where this router sent it lately).
`balance: least_loaded` ignores the prefix; `round_robin` (a benchmark's baseline)
takes the eligible workers in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.msg import Msg

from splitserve.client import ClientSecurity, open_channel
from splitserve.config.router import CostWeights, RouterConfig
from splitserve.control.generation import GENERATION_SERVICE
from splitserve.engine.page_allocator import page_hashes
from splitserve.priority import HIGH, PRIORITIES, class_rank
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import MalformedMessage
from splitserve.queue.messages import WorkerStats, decode_kv_events
from splitserve.queue.registry import WorkerRegistry, parse_descriptor
from splitserve.queue.stats import StatsSubscription
from splitserve.queue.subjects import KV_EVENTS_PREFIX
from splitserve.router.admission import Ticket, TtftModel
from splitserve.router.prefix_index import PrefixIndex, RecentRoutes
from splitserve.rpc import generation_pb2_grpc
from splitserve.tasks import stop_tasks

log = logging.getLogger(__name__)

HEALTH_RETRY_S = 1.0
Balance = Literal["kv_aware", "least_loaded", "round_robin"]
DEFAULT_WEIGHTS = CostWeights()


class PromptPages:
    """A prompt's token ids and its page hashes per page size, each hashed once: a
    request's choice, TTFT estimate and hedge all read the same hashes."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tokens
        self._hashes: dict[int, list[bytes]] = {}

    def hashes(self, page_size: int) -> list[bytes]:
        if page_size not in self._hashes:
            self._hashes[page_size] = page_hashes(self.tokens, page_size)
        return self._hashes[page_size]


@dataclass
class Backend:
    worker_id: str
    address: str
    incarnation: str
    page_size: int
    channel: grpc.aio.Channel
    stub: generation_pb2_grpc.GenerationStub
    # Generate calls this router has open on it, by priority class (high, normal, low),
    # and those of them with no first token back yet
    open_by_class: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))
    unstarted_by_class: list[int] = field(default_factory=lambda: [0] * len(PRIORITIES))
    serving: bool = False  # its health, as last seen
    unavailable_until: float = 0.0  # monotonic
    stats: WorkerStats | None = None
    stats_at: float = 0.0  # monotonic time the stats arrived
    ttft: TtftModel = field(default_factory=TtftModel)  # admission.py
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def eligible(self, now: float) -> bool:
        return self.serving and now >= self.unavailable_until

    @property
    def active(self) -> int:
        """Generate calls this router has open on it."""
        return sum(self.open_by_class)

    def open_ahead(self, priority: str) -> int:
        """The calls open on it that a request of `priority` would wait for there: all
        but those of lower classes it overtakes. The worker's waiting queue orders high >
        normal > low, so it overtakes lower classes' requests not yet started; a high
        one also takes a running lower one's place (engine/scheduler.py), so it
        overtakes every lower-class request."""
        rank = class_rank(priority)
        lower = self.open_by_class if rank == HIGH else self.unstarted_by_class
        return self.active - sum(lower[rank + 1:])

    # A call's life here, counted by class and in the TTFT model (admission.py) at once.
    def sent(self, tokens: int, priority: str, now: float) -> Ticket:
        """A call with `tokens` uncached prompt tokens went out."""
        rank = class_rank(priority)
        self.open_by_class[rank] += 1
        self.unstarted_by_class[rank] += 1
        return self.ttft.sent(tokens, priority, now)

    def first_token(self, ticket: Ticket, ttft_s: float) -> None:
        self.unstarted_by_class[class_rank(ticket.priority)] -= 1
        self.ttft.first_token(ticket, ttft_s)

    def ended(self, ticket: Ticket, started: bool) -> None:
        """The call ended, after its first token (`started`) or before it."""
        rank = class_rank(ticket.priority)
        self.open_by_class[rank] -= 1
        if not started:
            self.unstarted_by_class[rank] -= 1
            self.ttft.gave_up(ticket)


def load_cost(backend: Backend, now: float, stats_max_age_s: float,
              weights: CostWeights = DEFAULT_WEIGHTS, cached: float = 0.0,
              recent: float = 0.0, priority: str = "normal") -> float:
    """`active` × the requests a request of `priority` queues behind there +
    `kv_occupancy` × the used fraction of its KV pages − `cached_prefix` × `cached` −
    `recent_prefix` × `recent` (the fractions of the prompt's pages it holds).

    The requests ahead: those this router has open there that the request would not
    overtake (`Backend.open_ahead`: a burst of high-priority requests then spreads over
    the workers however many lower-class ones each holds), plus, when fresh stats report
    a queue deeper than all this router has open there, the rest: other routers'
    requests, of classes unknown. With a single class this is the larger of the two
    counts."""
    active, kv = float(backend.open_ahead(priority)), 0.0
    stats = backend.stats
    if stats is not None and now - backend.stats_at <= stats_max_age_s:
        active += max(0, stats.queue_depth - backend.active)
        total = stats.num_kv_pages_used + stats.num_kv_pages_free
        kv = stats.num_kv_pages_used / total if total else 0.0
    return (weights.active * active + weights.kv_occupancy * kv
            - weights.cached_prefix * cached - weights.recent_prefix * recent)


class DecodePool:
    def __init__(self, security: ClientSecurity, *, stats_max_age_s: float = 5.0,
                 unavailable_backoff_s: float = 5.0, weights: CostWeights = DEFAULT_WEIGHTS,
                 balance: Balance = "kv_aware", keepalive_s: float = RouterConfig.keepalive_s,
                 keepalive_timeout_s: float = RouterConfig.keepalive_timeout_s) -> None:
        self.security = security
        self.keepalive_options: list[tuple[str, int]] = []
        if keepalive_s:  # 0: off
            self.keepalive_options = [
                ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
                # what actually bounds the wait for the ping's answer (grpc 1.6x+)
                ("grpc.http2.ping_timeout_ms", round(keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]  # a watch sends no data
        self.balance = balance
        self.stats_max_age_s = stats_max_age_s
        self.unavailable_backoff_s = unavailable_backoff_s
        self.weights = weights
        self.backends: dict[str, Backend] = {}
        self.index = PrefixIndex()
        self.recent = RecentRoutes()
        self._turn = itertools.count()
        self.num_malformed_events = 0
        self.changed = asyncio.Event()  # set whenever a backend's eligibility may change

    # -- choice --------------------------------------------------------------------

    def choose(self, exclude: Iterable[str] = (), prompt: Sequence[int] | PromptPages = (),
               priority: str = "normal") -> Backend | None:
        """The eligible backend with the lowest cost for `prompt` (its token ids, or its
        PromptPages to hash them once per request; empty: by load alone) of `priority`,
        not in `exclude`, or None. The choice is remembered for the prompt's pages
        (`recent`)."""
        pages = prompt if isinstance(prompt, PromptPages) else PromptPages(prompt)
        now = time.monotonic()
        skip = set(exclude)
        candidates = [b for b in self.backends.values()
                      if b.eligible(now) and b.worker_id not in skip]
        if not candidates:
            return None
        if self.balance == "round_robin":  # the baseline: in turn, blind to load and KV
            candidates.sort(key=lambda b: b.worker_id)
            return candidates[next(self._turn) % len(candidates)]
        by_load = self.balance == "least_loaded" or not pages.tokens
        costs = []
        for b in candidates:
            mine = [] if by_load else pages.hashes(b.page_size)
            cached = recent = 0.0
            if mine:
                held = self.index.matched_pages(mine, [b.worker_id])[b.worker_id]
                cached = held / len(mine)
                recent = self.recent.matched_pages(mine, b.worker_id) / len(mine)
            costs.append(load_cost(b, now, self.stats_max_age_s, self.weights, cached, recent,
                                   priority))
        best = min(costs)
        tied = [b for b, c in zip(candidates, costs, strict=True) if c <= best + 1e-9]
        chosen = tied[next(self._turn) % len(tied)]
        if not by_load and pages.hashes(chosen.page_size):
            self.recent.record(pages.hashes(chosen.page_size), chosen.worker_id)
        return chosen

    def uncached_tokens(self, backend: Backend, prompt: PromptPages) -> int:
        """Tokens of `prompt` the backend would have to prefill (its index says)."""
        if not prompt.tokens:
            return 0
        hashes = prompt.hashes(backend.page_size)
        held = self.index.matched_pages(hashes, [backend.worker_id])[backend.worker_id]
        return max(1, len(prompt.tokens) - held * backend.page_size)

    def mark_unavailable(self, backend: Backend) -> None:
        backend.unavailable_until = time.monotonic() + self.unavailable_backoff_s
        log.info("worker %s (%s): unavailable; no traffic for %.0f s or until it serves",
                 backend.worker_id, backend.address, self.unavailable_backoff_s)

    def num_eligible(self) -> int:
        now = time.monotonic()
        return sum(b.eligible(now) for b in self.backends.values())

    # -- membership ----------------------------------------------------------------

    def add(self, worker_id: str, address: str, incarnation: str, page_size: int = 16
            ) -> Backend:
        """A backend for the worker (replacing one of another address or incarnation)."""
        old = self.backends.get(worker_id)
        if old is not None and (old.address, old.incarnation) == (address, incarnation):
            return old
        if old is not None:
            self._close(old)
        channel = open_channel(address, self.security, self.keepalive_options)
        backend = Backend(worker_id, address, incarnation, page_size, channel,
                          generation_pb2_grpc.GenerationStub(channel))
        backend.tasks.append(asyncio.create_task(self._watch_health(backend),
                                                 name=f"health {worker_id}"))
        self.backends[worker_id] = backend
        log.info("decode worker %s joined at %s", worker_id, address)
        return backend

    def remove(self, worker_id: str) -> None:
        backend = self.backends.pop(worker_id, None)
        if backend is not None:
            log.info("decode worker %s left", worker_id)
            self._close(backend)
            self.index.forget(worker_id)
            self.changed.set()

    def _close(self, backend: Backend) -> None:
        for task in backend.tasks:
            task.cancel()
        asyncio.get_running_loop().create_task(backend.channel.close(grace=None))

    async def close(self) -> None:
        tasks = [task for backend in self.backends.values() for task in backend.tasks]
        for worker_id in list(self.backends):
            self.remove(worker_id)
        await stop_tasks(*tasks)

    async def _watch_health(self, backend: Backend) -> None:
        stub = health_pb2_grpc.HealthStub(backend.channel)
        request = health_pb2.HealthCheckRequest(service=GENERATION_SERVICE)
        while True:
            try:
                async for reply in stub.Watch(request):
                    self._set_serving(backend, reply.status == reply.SERVING)
            except grpc.aio.AioRpcError as exc:
                log.debug("worker %s health watch: %s", backend.worker_id, exc.code().name)
            self._set_serving(backend, False)
            await asyncio.sleep(HEALTH_RETRY_S)

    def _set_serving(self, backend: Backend, serving: bool) -> None:
        if serving != backend.serving:
            log.info("decode worker %s: %s", backend.worker_id,
                     "SERVING" if serving else "not serving")
        backend.serving = serving
        if serving:
            backend.unavailable_until = 0.0
        self.changed.set()

    # -- feeds ---------------------------------------------------------------------

    async def follow_registry(self, registry: WorkerRegistry, broker: BrokerConnection) -> None:
        """Keep `backends` equal to the registry's decode workers; runs until cancelled."""
        async for event in registry.watch_forever(broker):
            if event is None:  # restarted: drop whoever left while we were not watching
                for worker_id in set(self.backends) - await registry.live_ids():
                    self.remove(worker_id)
                continue
            worker_id, data = event
            descriptor = None if data is None else parse_descriptor(worker_id, data)
            if descriptor is None or descriptor.role != "decode":  # gone, or switched roles
                self.remove(worker_id)
            elif descriptor.grpc_address:
                self.add(worker_id, descriptor.grpc_address, descriptor.incarnation,
                         descriptor.geometry.page_size or 16)

    async def follow_kv_events(self, broker: BrokerConnection) -> None:
        """Feed the prefix index from `splitserve.kv.*`; runs until cancelled."""
        async def on_message(msg: Msg) -> None:
            try:
                events = decode_kv_events(msg.data)
            except MalformedMessage as exc:
                self.num_malformed_events += 1
                log.warning("KV events on %s dropped: %s", msg.subject, exc)
                return
            if events.worker_id in self.backends:
                self.index.apply(events)

        subscription = await broker.nc.subscribe(f"{KV_EVENTS_PREFIX}.*", cb=on_message)
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def follow_stats(self, broker: BrokerConnection) -> None:
        subscription = await StatsSubscription.subscribe(broker.nc, role="decode")
        try:
            async for stats in subscription:
                backend = self.backends.get(stats.worker_id)
                if backend is not None:
                    backend.stats, backend.stats_at = stats, time.monotonic()
        finally:
            with contextlib.suppress(Exception):
                await subscription.close()
