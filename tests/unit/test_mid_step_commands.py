"""Commands run between two layers of a step (`AsyncEngine.call(..., mid_step=True)`):
admitting a request, reserving landing pages and accepting a remote prefill while a
step is in progress give the same tokens as when nothing overlaps, and leave the
pages as they would be; only mid-step commands run mid-step.

The engine-level tests run the commands from the runner's `between_layers` hook of a
step in progress (what `AsyncEngine` does with its mid-step queue), so the overlap is
certain, not left to timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from test_remote_prefill import FAR, remote_prefill

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.llm_engine import Engine
from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)
PROMPT_A = [(5 * i + 1) % 500 for i in range(30)]
PROMPT_B = [(11 * i + 2) % 500 for i in range(9)]
PROMPT_C = [(3 * i + 4) % 500 for i in range(14)]  # partial last page: an owned copy


def _once_mid_step(engine: Engine, command: Callable[[Engine], None]) -> list[bool]:
    """Run `command(engine)` at the first layer boundary of the next step; the list
    gets the value of `engine.in_step` it saw."""
    seen: list[bool] = []

    def hook() -> None:
        if not seen:
            seen.append(engine.in_step)
            command(engine)

    engine.runner.between_layers = hook
    return seen


def _tokens(outputs, into: dict[str, list[int]]) -> None:  # type: ignore[no-untyped-def]
    for out in outputs:
        into.setdefault(out.request_id, []).extend(out.new_token_ids)


def test_requests_admitted_mid_step_decode_as_if_alone(tiny_engine) -> None:
    expected_a, expected_b = tiny_engine().generate([PROMPT_A], GREEDY)[0], \
        tiny_engine().generate([PROMPT_B], SEEDED)[0]
    engine = tiny_engine()
    engine.add_request("a", PROMPT_A, GREEDY)
    got: dict[str, list[int]] = {}
    _tokens(engine.step(), got)  # a's prefill
    seen = _once_mid_step(engine, lambda e: e.add_request("b", PROMPT_B, SEEDED))
    num_steps = engine.num_steps
    _tokens(engine.step(), got)  # a's decode step; b joins the next one
    assert seen == [True] and engine.num_steps == num_steps + 1
    assert "b" not in got
    engine.runner.between_layers = None
    while engine.has_unfinished:
        _tokens(engine.step(), got)
    assert got == {"a": expected_a, "b": expected_b}
    assert engine.allocator.num_used_pages == 0


def test_remote_prefill_reserved_and_accepted_mid_step_equals_local(tiny_engine) -> None:
    [expected_a] = tiny_engine().generate([PROMPT_A], GREEDY)
    [expected_c] = tiny_engine().generate([PROMPT_C], GREEDY)
    decode, prefill = tiny_engine(), tiny_engine()
    decode.add_request("a", PROMPT_A, GREEDY)
    got: dict[str, list[int]] = {}
    _tokens(decode.step(), got)
    plans = []
    seen = _once_mid_step(decode, lambda e: plans.append(
        e.reserve_remote("c", PROMPT_C, GREEDY, attempt=1, release_at=FAR)))
    _tokens(decode.step(), got)
    [plan] = plans
    assert seen == [True] and plan is not None
    first = remote_prefill(prefill, decode, "c", PROMPT_C, plan)
    accepted = []
    seen = _once_mid_step(decode, lambda e: accepted.append(e.accept_remote("c", 1, first)))
    _tokens(decode.step(), got)
    assert seen == [True] and accepted[0].new_token_ids == [first]
    got["c"] = [first]
    decode.runner.between_layers = None
    while decode.has_unfinished:
        _tokens(decode.step(), got)
    assert got == {"a": expected_a, "c": expected_c}
    assert decode.allocator.num_used_pages == 0
    assert decode.allocator.num_quarantined_pages == len(plan.landing_page_ids)


async def test_only_mid_step_calls_run_during_a_step(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    runner = engine.engine.runner
    run_mid_step = runner.between_layers
    assert run_mid_step is not None
    inside, go_on = threading.Event(), threading.Event()

    def hold_the_first_step() -> None:  # the engine thread waits here, inside a step
        if not go_on.is_set():
            inside.set()
            go_on.wait(10.0)
        run_mid_step()

    runner.between_layers = hold_the_first_step
    await engine.start()
    try:
        stream = engine.generate("long", PROMPT_A, SamplingParams(max_tokens=30,
                                                                  temperature=0))
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(inside.wait, 10.0)
        between = engine.call(lambda e: (e.in_step, e.num_steps))
        mid = engine.call(lambda e: (e.in_step, e.num_steps), mid_step=True)
        go_on.set()
        assert await mid == (True, 0)  # in the first step, queued after `between`
        assert await between == (False, 1)
        await first
        await stream.aclose()
        # idle: a mid-step call runs between steps, at once
        for _ in range(100):
            if await engine.call(lambda e: not e.has_unfinished):
                break
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(engine.call(lambda e: e.in_step, mid_step=True),
                                      1.0) is False
    finally:
        go_on.set()
        await engine.stop()


async def test_a_mid_step_call_queued_during_a_command_runs_when_idle(tiny_engine) -> None:
    """Its no-op wake-up is taken after the command in progress: the mid-step queue is
    drained then too, not left for a step that never comes (CI at 3c25d5d)."""
    engine = AsyncEngine(tiny_engine())
    inside, go_on = threading.Event(), threading.Event()

    def held(_: Engine) -> None:
        inside.set()
        go_on.wait(10.0)

    await engine.start()
    try:
        first = engine.call(held)
        assert await asyncio.to_thread(inside.wait, 10.0)
        mid = engine.call(lambda e: e.in_step, mid_step=True)
        go_on.set()
        await first
        assert await asyncio.wait_for(mid, 2.0) is False
    finally:
        go_on.set()
        await engine.stop()


async def test_a_mid_step_call_that_raises_reaches_its_caller_only(tiny_engine) -> None:
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    try:
        stream = engine.generate("a", PROMPT_A, GREEDY)
        tokens = []
        async for out in stream:
            tokens += out.new_token_ids
            if len(tokens) == 2:
                try:
                    await engine.call(lambda e: e.add_request("a", PROMPT_B, GREEDY),
                                      mid_step=True)
                except Exception as exc:  # noqa: BLE001 - the duplicate id, as between steps
                    assert type(exc).__name__ == "DuplicateRequest"
                else:
                    raise AssertionError("a duplicate request id was admitted")
        assert tokens == tiny_engine().generate([PROMPT_A], GREEDY)[0]
        assert engine.is_running
    finally:
        await engine.stop()
