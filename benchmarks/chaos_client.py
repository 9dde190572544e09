"""The chaos suite's clients: gRPC Generate calls with the retries a real client makes,
and what each logical request finally got.

A client retries UNAVAILABLE (the decode worker is draining, dead or restarting: same
address, it comes back) and RESOURCE_EXHAUSTED with exponential backoff, and a stream
that ended without its final chunk; ALREADY_EXISTS means its request id is still in
flight (a duplicate waits for its original to finish, then re-sends). Any other code
ends the request: it is lost. Every call of one logical request carries the same
caller request id.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import grpc
from chaos_workload import Request

from splitserve.rpc import generation_pb2, generation_pb2_grpc

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.ALREADY_EXISTS)
BACKOFF_S = (0.1, 2.0)  # first and largest pause between two calls
# A restarted decode worker must be found again within a second, not after grpc's
# default reconnect backoff (up to 120 s).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000))
UNFINISHED = generation_pb2.FINISH_REASON_UNSPECIFIED
COMPLETE = (generation_pb2.FINISH_REASON_STOP, generation_pb2.FINISH_REASON_LENGTH)


@dataclass
class Outcome:
    """Everything one logical request received, over all its calls."""

    request: Request
    # Each stream's chunks (token ids per chunk): complete outputs, and streams cut
    # before their final chunk.
    outputs: list[list[list[int]]] = field(default_factory=list)
    partials: list[list[list[int]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # status codes, in order
    num_refused: int = 0  # ALREADY_EXISTS answers
    num_incomplete: int = 0  # streams that ended OK without a final chunk
    stream_duplicates: list[str] = field(default_factory=list)  # why a stream over-delivered
    misrouted: bool = False  # a chunk named another request id
    lost_reason: str = ""
    prefill: str = ""  # of the complete output: "local" or "remote"
    num_attempts: int = 0
    sent_s: float = 0.0
    done_s: float | None = None  # when the complete output ended (monotonic)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Stream:
    """One call's chunks, taken apart."""

    chunks: list[list[int]]
    complete: bool
    duplicates: list[str]
    misrouted: bool
    prefill: str = ""
    num_attempts: int = 0


def read_stream(chunks: list[generation_pb2.GenerateChunk], request: Request) -> Stream:
    finish = UNFINISHED
    duplicates = []
    last = None
    for i, chunk in enumerate(chunks):
        if finish != UNFINISHED:
            duplicates.append(f"chunk {i} after the final chunk")
        if chunk.finish_reason != UNFINISHED:
            finish, last = chunk.finish_reason, chunk
    num_tokens = sum(len(c.token_ids) for c in chunks)
    if num_tokens > request.params.max_tokens:
        duplicates.append(f"{num_tokens} tokens > max_tokens {request.params.max_tokens}")
    stream = Stream([list(c.token_ids) for c in chunks], finish in COMPLETE, duplicates,
                    any(c.request_id != request.request_id for c in chunks))
    if last is not None:
        stream.prefill, stream.num_attempts = last.timing.prefill, last.timing.num_attempts
    return stream


class Client:
    """Sends logical requests to one decode worker address (a restarted worker comes
    back on the same address)."""

    def __init__(self, address: str, deadline_s: float) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.deadline_s = deadline_s

    async def close(self) -> None:
        await self.channel.close()

    async def run(self, request: Request, outcome: Outcome,
                  on_first_chunk: Callable[[], None] | None = None,
                  before_resend: Callable[[], Awaitable[object]] | None = None) -> None:
        """Until one complete output, a final error or the deadline. `before_resend`
        (duplicates) is awaited after ALREADY_EXISTS instead of the backoff."""
        p = request.params
        message = generation_pb2.GenerateRequest(
            token_ids=list(request.prompt), max_tokens=p.max_tokens, temperature=p.temperature,
            top_p=p.top_p, ignore_eos=p.ignore_eos, request_id=request.request_id)
        if p.seed is not None:
            message.seed = p.seed
        outcome.sent_s = time.monotonic()
        deadline = outcome.sent_s + self.deadline_s
        pause_s = BACKOFF_S[0]
        try:
            while (remaining_s := deadline - time.monotonic()) > 0:
                chunks: list[generation_pb2.GenerateChunk] = []
                try:
                    async for chunk in self.stub.Generate(message, timeout=remaining_s):
                        chunks.append(chunk)
                        if len(chunks) == 1 and on_first_chunk is not None:
                            on_first_chunk()
                except grpc.aio.AioRpcError as exc:
                    outcome.errors.append(exc.code().name)
                    if chunks:
                        outcome.partials.append(read_stream(chunks, request).chunks)
                    if exc.code() not in RETRIED:
                        outcome.lost_reason = f"{exc.code().name}: {exc.details()}"
                        return
                    if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                        outcome.num_refused += 1
                        if before_resend is not None:
                            await before_resend()
                            continue
                else:
                    stream = read_stream(chunks, request)
                    outcome.misrouted |= stream.misrouted
                    outcome.stream_duplicates += stream.duplicates
                    if stream.complete:
                        outcome.outputs.append(stream.chunks)
                        outcome.prefill = stream.prefill
                        outcome.num_attempts = stream.num_attempts
                        outcome.done_s = time.monotonic()
                        return
                    outcome.num_incomplete += 1
                    outcome.partials.append(stream.chunks)
                await asyncio.sleep(min(pause_s * random.uniform(0.5, 1.0),
                                        max(0.0, deadline - time.monotonic())))
                pause_s = min(2 * pause_s, BACKOFF_S[1])
            if not outcome.lost_reason:
                outcome.lost_reason = f"no complete output in {self.deadline_s} s"
        finally:
            outcome.finished.set()


@dataclass
class Progress:
    """What the fault scripts wait on."""

    num_done: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def done(self) -> None:
        async with self.changed:
            self.num_done += 1
            self.changed.notify_all()

    async def wait_done(self, num: int, timeout_s: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.num_done >= num),
                                       timeout_s)
                return True
            except TimeoutError:
                return False


async def drive(client: Client, requests: list[Request], concurrency: int, gate_index: int,
                gate: asyncio.Event, progress: Progress) -> list[Outcome]:
    """Run `requests` with `concurrency` in flight; requests from `gate_index` on wait
    for `gate` (the fault is over). A duplicate starts when its original's first chunk
    arrives, outside the concurrency limit."""
    outcomes = {id(r): Outcome(r) for r in requests}
    originals = [r for r in requests if not r.duplicate]
    duplicate_of = {r.request_id: r for r in requests if r.duplicate}
    side_tasks: list[asyncio.Task[None]] = []
    started: set[str] = set()
    queue: asyncio.Queue[tuple[int, Request]] = asyncio.Queue()
    for item in enumerate(originals):
        queue.put_nowait(item)

    def start_duplicate(original: Outcome) -> None:
        if original.request.request_id in started:
            return
        started.add(original.request.request_id)
        twin = duplicate_of[original.request.request_id]
        side_tasks.append(asyncio.create_task(client.run(
            twin, outcomes[id(twin)], before_resend=original.finished.wait)))

    async def worker() -> None:
        while not queue.empty():
            index, request = queue.get_nowait()
            if index >= gate_index:
                await gate.wait()
            outcome = outcomes[id(request)]
            has_twin = request.request_id in duplicate_of
            await client.run(request, outcome,
                             on_first_chunk=partial(start_duplicate, outcome) if has_twin
                             else None)
            if has_twin:  # no-op unless the original never streamed: send it now
                start_duplicate(outcome)
            await progress.done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await asyncio.gather(*side_tasks)
    return [outcomes[id(r)] for r in requests]
