"""The engine on its own thread, driven from asyncio.

The engine is single-threaded. `AsyncEngine` owns one thread that alternates
between (1) running the commands callers queued (add a request, abort one, insert
a remotely prefilled sequence...) and (2) one `Engine.step()`. Outputs go back to
each request's asyncio queue with `call_soon_threadsafe`. torch releases the GIL
inside its kernels, so the event loop (gRPC, NATS, NIXL polling) stays responsive
while a step runs.

A command that touches no page of the step in progress may ask to run *mid-step*
(`call(..., mid_step=True)`): between two layers of the step's forward, instead of
after the step (on one fp32 core a decode step of 8-16 sequences is 60-80 ms, a step
with a prompt chunk several hundred: a remote prefill waits for one at admission and
one at accept). Such commands may add sequences (waiting, or running from the next
step on), reserve free or cached-but-unreferenced pages and read anything; the step's
own sequences hold their pages, and `update`/postprocess see only the step's plan.
Commands that free pages or change a sequence (abort, fallback, retry, release) stay
between steps. A mid-step command may run before regular commands queued earlier.

Nothing else reads the engine's scheduler or allocator: after every step and every
command the thread takes an `EngineStats` snapshot (engine/stats.py) and hands it to
the loop with the step's outputs or the command's answer, so an awaited `call` or a
delivered output is never newer than `stats`; `stats_listeners` hear of each
snapshot; `info` holds the facts fixed at start-up.

If the thread dies (an exception out of a step or a command), the engine fails
loudly: `is_running` turns False, every open stream and every pending `call` gets
EngineStopped, and `crashed` is set on the event loop so the daemon can stop
serving and exit non-zero instead of staying registered with a dead engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from typing import Any, TypeVar

import torch

from splitserve.engine.llm_engine import Engine
from splitserve.engine.output import RequestOutput
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.stats import EngineInfo, EngineStats

log = logging.getLogger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.05  # idle thread wakes this often to release quarantined pages


class EngineStopped(RuntimeError):
    """The engine thread is not running (never started, stopped, or crashed)."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._mid_step: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        engine.runner.between_layers = self._run_mid_step
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._pending: set[asyncio.Future[Any]] = set()  # `call`s not answered yet
        self.step_listeners: list[Callable[[list[RequestOutput]], None]] = []
        self.info: EngineInfo = engine.info
        self.tokenizer = engine.tokenizer
        self.stats: EngineStats = engine.stats()  # the thread is not running yet
        self.stats_listeners: list[Callable[[EngineStats], None]] = []
        self.error: BaseException | None = None  # what killed the thread, if it died
        self.crashed = asyncio.Event()  # set on the loop once the thread died of `error`

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._running = False
        self._commands.put(lambda: None)  # wake the thread
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        # Commands queued after the thread's last drain never run.
        self._fail_pending(EngineStopped("engine stopped"))

    @property
    def is_running(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """`Engine.validate`, from any thread: it reads only facts fixed at start-up."""
        self.engine.validate(prompt_token_ids, params)

    # --- commands --------------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T], dispatch: bool = False,
             mid_step: bool = False) -> asyncio.Future[T]:
        """Run `fn(engine)` on the engine thread between two steps, or with `mid_step`
        at the next layer boundary of the step in progress (only for commands that
        touch no page of that step: see the module docstring).

        With `dispatch`, a RequestOutput that `fn` returns also goes to its request's
        stream, ahead of anything a later step produces for it.
        """
        if not self.is_running or self._loop is None:
            raise EngineStopped("engine is not running")
        loop = self._loop
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

        def command() -> None:
            try:
                result = fn(self.engine)
                if dispatch and isinstance(result, RequestOutput):
                    self._dispatch([result])
            except BaseException as exc:  # noqa: BLE001 (handed to the awaiting caller)
                loop.call_soon_threadsafe(self._answer, fut, None, exc, self._snapshot())
            else:
                loop.call_soon_threadsafe(self._answer, fut, result, None, self._snapshot())

        if mid_step:
            self._mid_step.put(command)
            self._commands.put(_nothing)  # wakes an idle thread
        else:
            self._commands.put(command)
        return fut

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput | BaseException]:
        """Register where `request_id`'s outputs go; call before the request is added."""
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def generate(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
        hold_pages: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request (validation errors raise here) and yield its outputs.

        Leaving the iteration early (the client went away) aborts the request.
        """
        stream = self.open_stream(request_id)
        try:
            await self.call(lambda e: e.add_request(request_id, prompt_token_ids, params,
                                                    hold_pages))
            async for out in self.iterate(request_id, stream):
                yield out
        finally:
            self.close_stream(request_id)

    async def iterate(
        self, request_id: str, stream: asyncio.Queue[RequestOutput | BaseException]
    ) -> AsyncIterator[RequestOutput]:
        """Yield a stream's outputs until its request finishes; abort it if abandoned."""
        finished = False
        try:
            while True:
                out = await stream.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise EngineStopped(f"engine failed: {out!r}") from out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished and self.is_running:
                self.call(lambda e: e.abort(request_id))

    # --- the thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._running:
                if self._drain_commands(block=not self.engine.has_unfinished):
                    self._publish_stats()  # pages left quarantine while idle
                if self.engine.has_unfinished:
                    outputs = self.engine.step()
                    if outputs:
                        self._dispatch(outputs)
                    else:
                        self._publish_stats()
        except BaseException as exc:
            self.error = exc
            self._running = False  # before the loop hears of it: is_running is False then
            log.exception("engine thread crashed")
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._on_crash, exc)
                except RuntimeError:  # the loop is closed: nobody is left to tell
                    pass
        finally:
            self._running = False

    def _on_crash(self, exc: BaseException) -> None:
        """On the loop: fail every stream and pending call, then set `crashed`."""
        for stream in self._streams.values():
            stream.put_nowait(exc)
        self._fail_pending(EngineStopped(f"engine thread crashed: {exc!r}"))
        self.crashed.set()

    def _fail_pending(self, exc: EngineStopped) -> None:
        for fut in list(self._pending):
            _set_exception(fut, exc)
            if not fut.cancelled():
                # Fire-and-forget calls (aborts on the way out) are never awaited: mark
                # the error seen so shutdown logs no "exception was never retrieved".
                # An awaiting caller still gets it raised.
                fut.exception()

    def _run_mid_step(self) -> None:
        """Between two layers of a step (the forward runs in inference mode: the
        commands do not, as between steps)."""
        if not self._mid_step.empty():
            with torch.inference_mode(False):
                _drain(self._mid_step)

    def _drain_commands(self, block: bool) -> bool:
        """Run the queued commands (each answer carries a snapshot); with none, release
        quarantined pages: whether any were released.

        A mid-step command is queued before its no-op in `_commands`, so draining the
        mid-step queue before *each* regular command runs it whichever no-op is taken
        (taking its no-op without draining left it queued until the next step)."""
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else \
                self._commands.get_nowait()
        except queue.Empty:
            return bool(self.engine.allocator.release_quarantined(time.monotonic()))
        while True:
            _drain(self._mid_step)  # mid-step commands first, as within a step
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False

    def _publish_stats(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._set_stats, self._snapshot())

    def _snapshot(self) -> EngineStats:
        """On the engine thread: a snapshot to deliver, with the prefix-cache changes
        since the last one (each reaches the stats listeners exactly once)."""
        return self.engine.stats(take_kv_events=True)

    def _set_stats(self, stats: EngineStats) -> None:
        self.stats = stats
        for listener in self.stats_listeners:
            listener(stats)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # The snapshot travels with the outputs: whoever sees an output sees stats at
        # least as new as the step that produced it.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, outputs, self._snapshot())

    def _answer(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None,
                stats: EngineStats) -> None:
        self._set_stats(stats)
        if exc is not None:
            _set_exception(fut, exc)
        else:
            _set_result(fut, result)

    def _deliver(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self._set_stats(stats)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
        for listener in self.step_listeners:
            listener(outputs)


def _nothing() -> None:
    pass


def _drain(commands: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        try:
            command = commands.get_nowait()
        except queue.Empty:
            return
        command()


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
