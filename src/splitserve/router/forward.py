"""One request through the router: pick a decode worker, stream its chunks back.

Life cycle of a forwarded request:
0. At most `qos.max_in_flight` requests are open here; beyond, RESOURCE_EXHAUSTED.
1. Wait (up to `connect_timeout_s`) for an eligible worker; none → UNAVAILABLE.
   Admission (admission.py): if the request's TTFT estimate there exceeds what its
   priority class accepts, RESOURCE_EXHAUSTED now, before the worker sees it.
2. Call `Generation.Generate` on the cheapest one for the prompt (pool.py: load and
   cached prefix; a text prompt is placed by load alone) with the router's
   credentials for the workers and the time left of `request_timeout_s`.
   Hedging (qos.hedge, high priority only): when the estimate there exceeds the class's
   TTFT SLO and another worker is idle, both get the request; the first chunk wins and
   the other call is cancelled.
3. UNAVAILABLE before the first chunk (draining, stopping, gone, unreachable), or
   RESOURCE_EXHAUSTED from the worker (its waiting queue full, or the prompt can never
   fit its KV pool): nothing was produced, so the same request (same id) goes to the
   next worker; each worker is tried at most once, and the last one's error ends it.
   Any other error, or one after the first chunk, ends the request with the worker's
   status code and message (`UpstreamError`).
4. The caller leaving early (HTTP client gone, gRPC cancel) closes the stream, which
   cancels the worker's call: the worker aborts the request and frees its pages.
5. A request that completes (its last chunk says stop or length) is judged against its
   class's TTFT and TPOT SLOs from its arrival (slo.py) and counted by outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import grpc

from splitserve.client import ClientSecurity
from splitserve.config.router import QosConfig
from splitserve.router.admission import Estimate, degraded_max_tokens, refusal
from splitserve.router.pool import Backend, DecodePool, PromptPages
from splitserve.router.slo import SloClock, SloCounters
from splitserve.rpc import generation_pb2 as pb

log = logging.getLogger(__name__)

# A worker's answer before its first chunk that another worker may not give.
NEXT_WORKER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# The last chunk of a request that completed, to be judged against its class's SLOs.
COMPLETED = frozenset({pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH})


class UpstreamError(Exception):
    """The request failed with a gRPC status (the worker's, or the router's own)."""

    def __init__(self, code: grpc.StatusCode, details: str, worker_id: str = "",
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.worker_id, self.trailing = code, details, worker_id, trailing


@dataclass
class ForwardCounters:
    num_requests: int = 0
    num_retries: int = 0  # another worker tried (NEXT_WORKER_CODES before the first chunk)
    num_no_worker: int = 0  # no eligible worker within connect_timeout_s
    num_failed: int = 0  # ended with an error status
    num_cancelled: int = 0  # the caller left early
    num_refused: int = 0  # RESOURCE_EXHAUSTED here: over a class's TTFT limit, or full
    num_degraded: int = 0  # max_tokens capped under load
    num_hedged: int = 0  # high-priority requests raced on two workers


@dataclass
class ForwardNote:
    """What the forwarder did to a request, for the response: the max_tokens it was
    capped at under load (graceful degradation), the worker that served it."""

    degraded_max_tokens: int | None = None
    worker_id: str = ""


@dataclass(frozen=True)
class ForwardSettings:
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    qos: QosConfig = field(default_factory=QosConfig)


class Forwarder:
    def __init__(self, pool: DecodePool, security: ClientSecurity,
                 settings: ForwardSettings = ForwardSettings()) -> None:
        self.pool = pool
        self.security = security
        self.settings = settings
        self.counters = ForwardCounters()
        self.slo = SloCounters()
        # called with each request's TTFT (arrival → first tokens), HTTP and gRPC alike
        self.first_token_listeners: list[Callable[[float], None]] = []
        self.num_in_flight = 0
        self.num_hedging = 0

    async def _next_backend(self, tried: set[str], deadline: float, prompt: PromptPages,
                            priority: str) -> Backend | None:
        while True:
            backend = self.pool.choose(tried, prompt, priority)
            left = deadline - time.monotonic()
            if backend is not None or left <= 0 or tried:
                return backend
            self.pool.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pool.changed.wait(), left)

    async def stream(self, request: pb.GenerateRequest, note: ForwardNote | None = None,
                     arrived_s: float | None = None) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The chunks of `request` (which carries its request id), from one worker;
        `note` learns what was changed on the way. A request that completes is judged
        against its class's SLOs (slo.py) from `arrived_s` (monotonic; default: now)."""
        note = note if note is not None else ForwardNote()
        self.counters.num_requests += 1
        start = time.monotonic()
        clock = SloClock(start if arrived_s is None else arrived_s)
        tried: set[str] = set()
        prompt = PromptPages(request.token_ids)
        last: UpstreamError | None = None
        qos = self.settings.qos
        if self.num_in_flight >= qos.max_in_flight:
            self.counters.num_refused += 1
            raise UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the router has "
                                f"{self.num_in_flight} requests open, its limit; retry later")
        self.num_in_flight += 1
        try:
            while True:
                backend = await self._next_backend(
                    tried, start + self.settings.connect_timeout_s, prompt, request.priority)
                if backend is None:
                    if last is not None:
                        raise last
                    self.counters.num_no_worker += 1
                    raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                        "no decode worker is serving; retry later")
                tokens = self.pool.uncached_tokens(backend, prompt)
                estimate = backend.ttft.estimate(tokens, request.priority, time.monotonic())
                reason = refusal(qos, request.priority, estimate)
                if reason is not None:
                    self.counters.num_refused += 1
                    raise UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason,
                                        backend.worker_id)
                cap = degraded_max_tokens(qos, request.priority, estimate,
                                          request.max_tokens
                                          if request.HasField("max_tokens") else None)
                if cap is not None:
                    request.max_tokens = cap
                    note.degraded_max_tokens = cap
                    self.counters.num_degraded += 1
                note.worker_id = backend.worker_id
                if tried:
                    self.counters.num_retries += 1
                tried.add(backend.worker_id)
                timeout_s = self.settings.request_timeout_s - (time.monotonic() - start)
                hedge = self._hedge_partner(backend, request, estimate, tried)
                calls = (self._call(backend, request, timeout_s, tokens) if hedge is None else
                         self._race(backend, tokens, hedge, self.pool.uncached_tokens(
                             hedge, prompt), request, timeout_s))
                started = False
                try:
                    async with contextlib.aclosing(calls):  # closed at once if we are
                        async for chunk in calls:
                            started = True
                            ttft_s = clock.chunk(len(chunk.token_ids), time.monotonic())
                            if ttft_s is not None:
                                for listener in self.first_token_listeners:
                                    listener(ttft_s)
                            if chunk.finish_reason in COMPLETED:
                                self._judge(clock, request.priority)
                            yield chunk
                    return
                except UpstreamError as exc:
                    if started or exc.code not in NEXT_WORKER_CODES:
                        raise
                    if exc.code is grpc.StatusCode.UNAVAILABLE:
                        self.pool.mark_unavailable(backend)
                    last = exc
        except UpstreamError:
            self.counters.num_failed += 1
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self.counters.num_cancelled += 1
            raise
        finally:
            self.num_in_flight -= 1

    def _judge(self, clock: SloClock, priority: str) -> None:
        judged = clock.judged(self.settings.qos, priority)
        if judged is not None:
            self.slo.add(priority, judged.outcome)

    def _hedge_partner(self, backend: Backend, request: pb.GenerateRequest,
                       estimate: Estimate | None, tried: set[str]) -> Backend | None:
        """An idle worker to race `backend` with, when hedging applies (see QosConfig)."""
        qos = self.settings.qos
        slo = qos.ttft_slo_s.get(request.priority)
        if (not qos.hedge or request.priority != "high" or estimate is None
                or not estimate.over(slo) or self.num_hedging >= qos.max_hedges):
            return None
        now = time.monotonic()
        idle = [b for b in self.pool.backends.values()
                if b is not backend and b.worker_id not in tried and b.eligible(now)
                and b.active == 0 and b.ttft.pending_tokens == 0]
        return idle[0] if idle else None

    async def _race(self, first: Backend, first_tokens: int, second: Backend,
                    second_tokens: int, request: pb.GenerateRequest, timeout_s: float
                    ) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The same request on two workers: the first to send a chunk wins and streams;
        the other's call is cancelled (its worker aborts the request and frees its
        pages). If both fail, the first failure is raised."""
        self.counters.num_hedged += 1
        self.num_hedging += 1
        calls = [self._call(first, request, timeout_s, first_tokens),
                 self._call(second, request, timeout_s, second_tokens)]
        pending = {asyncio.ensure_future(anext(call)): call for call in calls}
        winner: tuple[AsyncGenerator[pb.GenerateChunk, None], pb.GenerateChunk] | None = None
        losers: list[AsyncGenerator[pb.GenerateChunk, None]] = []
        errors: list[UpstreamError] = []
        try:
            while pending and winner is None:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    call = pending.pop(task)
                    try:
                        chunk = task.result()
                    except UpstreamError as exc:
                        errors.append(exc)
                    except StopAsyncIteration:
                        errors.append(UpstreamError(grpc.StatusCode.INTERNAL,
                                                    "the call ended without a chunk"))
                    else:
                        if winner is None:
                            winner = (call, chunk)
                        else:
                            losers.append(call)  # answered in the same instant
        finally:
            self.num_hedging -= 1
            for task in pending:  # the loser (or both, when we are cancelled)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError,
                                         StopAsyncIteration):
                    await task
            for call in losers:
                await call.aclose()
        if winner is None:
            raise errors[0]
        call, chunk = winner
        try:
            yield chunk
            async for chunk in call:
                yield chunk
        finally:
            await call.aclose()

    async def _call(self, backend: Backend, request: pb.GenerateRequest, timeout_s: float,
                    tokens: int) -> AsyncGenerator[pb.GenerateChunk, None]:
        sent_s, first = time.monotonic(), False
        ticket = backend.sent(tokens, request.priority, sent_s)
        call = backend.stub.Generate(request, timeout=max(timeout_s, 0.001),
                                     metadata=self.security.metadata())
        try:
            async for chunk in call:
                if not first:
                    first = True
                    backend.first_token(ticket, time.monotonic() - sent_s)
                yield chunk
        except grpc.aio.AioRpcError as exc:
            trailing = tuple((k, v) for k, v in (exc.trailing_metadata() or ())
                             if isinstance(v, str))
            raise UpstreamError(exc.code(), exc.details() or "", backend.worker_id,
                                trailing) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller left
            # grpc.aio cancels the calls of a channel closed under them: the worker left
            # the registry (pool.remove), so this is the worker's failure, not the caller's
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE,
                                f"decode worker {backend.worker_id} left", backend.worker_id
                                ) from None
        finally:
            backend.ended(ticket, started=first)
            call.cancel()  # no-op when the call ended; else the worker aborts the request
