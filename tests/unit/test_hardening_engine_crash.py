"""A dying engine thread fails loudly: `crashed` is set, streams and calls get EngineStopped."""

from __future__ import annotations

import asyncio
import threading

import pytest

from splitserve.engine.async_engine import AsyncEngine, EngineStopped
from splitserve.engine.sampling import SamplingParams

LONG = SamplingParams(max_tokens=400, temperature=0)


class StepFault(RuntimeError):
    """The fault the test injects into `Engine.step`."""


async def test_step_exception_sets_crashed_and_fails_open_streams(
        tiny_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    try:
        steps = 0
        real_step = engine.engine.step

        def failing_step():  # type: ignore[no-untyped-def]
            nonlocal steps
            steps += 1
            if steps == 3:
                raise StepFault("boom")
            return real_step()

        monkeypatch.setattr(engine.engine, "step", failing_step)
        streams = [engine.generate(f"r{i}", [1, 2, 3 + i], LONG) for i in range(2)]
        firsts = await asyncio.gather(*(anext(s) for s in streams))
        assert [out.request_id for out in firsts] == ["r0", "r1"]

        await asyncio.wait_for(engine.crashed.wait(), timeout=10)

        assert not engine.is_running
        assert isinstance(engine.error, StepFault)
        for stream in streams:
            with pytest.raises(EngineStopped, match="engine failed: StepFault") as err:
                async for _ in stream:
                    pass
            assert err.value.__cause__ is engine.error
        with pytest.raises(EngineStopped, match="engine is not running"):
            engine.call(lambda e: e.has_unfinished)
    finally:
        await engine.stop()


async def test_call_queued_while_the_thread_dies_gets_engine_stopped(
        tiny_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command queued during the fatal step never runs; its caller must not hang."""
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    in_step, release = threading.Event(), threading.Event()

    def blocked_then_failing_step():  # type: ignore[no-untyped-def]
        in_step.set()
        release.wait(10)
        raise StepFault("boom")

    monkeypatch.setattr(engine.engine, "step", blocked_then_failing_step)
    try:
        stream = engine.generate("r0", [1, 2, 3], LONG)
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(in_step.wait, 10)
        pending = engine.call(lambda e: e.has_unfinished)  # the thread is inside step()
        release.set()

        with pytest.raises(EngineStopped, match="engine thread crashed: StepFault"):
            await asyncio.wait_for(pending, timeout=10)
        assert engine.crashed.is_set()
        with pytest.raises(EngineStopped):
            await asyncio.wait_for(first, timeout=10)
    finally:
        release.set()
        await engine.stop()


async def test_clean_stop_does_not_set_crashed(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    assert [o async for o in engine.generate("r", [1, 2], SamplingParams(max_tokens=2))]
    await engine.stop()
    await asyncio.sleep(0)
    assert not engine.crashed.is_set()
    assert engine.error is None
    assert not engine.is_running
