"""Priority classes in the engine (scheduler.py): the waiting queue orders high > normal >
low (first come first within a class), preemption takes the lowest class first, a high
request preempts low ones when pages run out, and no request loses or changes tokens.
The waiting queue is bounded (`max_num_waiting`)."""

from __future__ import annotations

import pytest

from splitserve.engine.errors import QueueFull
from splitserve.engine.llm_engine import Engine
from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def run(engine: Engine) -> tuple[list[str], dict[str, list[int]]]:
    """Step to the end: the order of first tokens and every request's tokens."""
    order: list[str] = []
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.request_id not in tokens:
                order.append(out.request_id)
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return order, tokens


def test_waiting_requests_go_by_class_then_arrival(tiny_engine) -> None:
    engine = tiny_engine(max_num_seqs=1)
    for rid, priority in [("low-1", "low"), ("normal-1", "normal"), ("high-1", "high"),
                          ("low-2", "low"), ("high-2", "high"), ("normal-2", "normal")]:
        engine.add_request(rid, [1, 2, 3, 4, 5], GREEDY, priority=priority)
    order, _ = run(engine)
    assert order == ["high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]


def test_preemption_takes_the_lowest_class_first(tiny_engine) -> None:
    """The low request is admitted first, so the old rule (most recently admitted)
    would preempt the normal one."""
    prompts = {"low": list(range(1, 30)), "normal": list(range(40, 69))}
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    roomy = {p: tiny_engine().generate([prompt], params)[0] for p, prompt in prompts.items()}
    tight = tiny_engine(num_pages=26)  # 104 tokens for two of 59: one must give way
    low = tight.add_request("low", prompts["low"], params, priority="low")
    first = tight.step()
    normal = tight.add_request("normal", prompts["normal"], params)
    _, tokens = run(tight)
    tokens["low"] = [t for o in first for t in o.new_token_ids] + tokens.get("low", [])
    assert low.num_preemptions > 0 and normal.num_preemptions == 0
    assert tokens == roomy
    assert tight.allocator.num_used_pages == 0


def test_a_high_request_preempts_low_ones_that_hold_the_pages(tiny_engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    roomy = tiny_engine().generate([list(range(1, 61)), list(range(60, 100))],
                                   [params, short])
    engine = tiny_engine(num_pages=25)  # 100 tokens: 61 + 40 do not fit together
    low = engine.add_request("low", list(range(1, 61)), params, priority="low")
    early = engine.step() + engine.step()  # low runs and holds 13+ pages
    high = engine.add_request("high", list(range(60, 100)), short, priority="high")
    outputs = engine.step()
    assert [o.request_id for o in outputs] == ["high"]  # it ran at once; low gave way
    assert [s.request_id for s in engine.scheduler.waiting] == ["low"]
    assert low.num_preemptions == 1 and high.num_preemptions == 0
    _, tokens = run(engine)
    first = [t for o in early + outputs for t in o.new_token_ids if o.request_id == "low"]
    assert [first + tokens["low"], outputs[0].new_token_ids + tokens["high"]] == roomy


def test_a_normal_request_never_preempts_its_own_class(tiny_engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = tiny_engine(num_pages=25)
    engine.add_request("first", list(range(1, 61)), params)
    engine.step()
    engine.add_request("second", list(range(60, 100)), params)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["first"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["second"]


def test_the_waiting_queue_is_bounded(tiny_engine) -> None:
    engine = tiny_engine(max_num_waiting=2, max_num_seqs=1)
    engine.add_request("a", [1, 2, 3], GREEDY)
    engine.add_request("b", [1, 2, 3], GREEDY)
    with pytest.raises(QueueFull, match="max_num_waiting"):
        engine.add_request("c", [1, 2, 3], GREEDY, priority="high")
    engine.step()  # "a" runs: one place free
    engine.add_request("c", [1, 2, 3], GREEDY, priority="high")
    order, _ = run(engine)
    assert order == ["a", "c", "b"]  # "a" runs on (one sequence at a time), then high first
