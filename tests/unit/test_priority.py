"""Priority classes in the engine (scheduler.py): the waiting queue orders high > normal >
low (first come first within a class), preemption takes the lowest class first, a high
request preempts low ones when pages or `max_num_seqs` places run out, running prompts
take the step's budget by class, and no request loses or changes tokens. The waiting
queue is bounded (`max_num_waiting`)."""

from __future__ import annotations

import pytest

from splitserve.engine.errors import QueueFull
from splitserve.engine.llm_engine import Engine
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.scheduler import PreemptReason

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
    assert order == ["c", "a", "b"]  # "c" takes a's place; "a" resumes before "b"


def test_a_high_request_takes_the_place_of_a_lower_one_when_none_is_free(tiny_engine) -> None:
    """max_num_seqs sequences run: a high request does not wait for one of them to finish;
    the most recently admitted of the lowest class gives way and resumes later."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = {"normal": list(range(1, 30)), "low": list(range(40, 52)),
               "high": list(range(60, 75))}
    roomy = dict(zip(prompts, tiny_engine().generate(list(prompts.values()), params)))
    engine = tiny_engine(max_num_seqs=2)
    engine.add_request("normal", prompts["normal"], params)
    low = engine.add_request("low", prompts["low"], params, priority="low")
    outputs = engine.step() + engine.step()
    assert len(engine.scheduler.running) == 2
    high = engine.add_request("high", prompts["high"], params, priority="high")
    step = engine.step()
    assert "high" in [o.request_id for o in step]  # at once, not after 18 more steps
    assert [s.request_id for s in engine.scheduler.waiting] == ["low"]
    assert (low.num_preemptions, high.num_preemptions) == (1, 0)
    _, rest = run(engine)
    tokens = {rid: [t for o in outputs + step if o.request_id == rid for t in o.new_token_ids]
              + rest[rid] for rid in prompts}
    assert tokens == roomy
    assert engine.allocator.num_used_pages == 0


def test_a_normal_request_waits_for_a_place_among_its_own_class(tiny_engine) -> None:
    engine = tiny_engine(max_num_seqs=1)
    engine.add_request("first", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0,
                                                          ignore_eos=True))
    engine.step()
    engine.add_request("second", [4, 5, 6], GREEDY)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["first"]
    assert engine.scheduler.num_preemptions == 0


def test_a_high_prompt_takes_the_budget_before_lower_prompts_under_way(tiny_engine) -> None:
    """Class by class: a high prompt that arrives while a normal one is mid-prompt gets
    the step's budget (its capped chunk, then the top-up) before the normal one's next
    chunk, until it is computed."""
    engine = tiny_engine(max_num_batched_tokens=12, max_prefill_chunk_tokens=8)
    normal = engine.add_request("normal", list(range(1, 41)), GREEDY)
    engine.step()  # normal: 8, topped up to 12
    high = engine.add_request("high", list(range(50, 90)), GREEDY, priority="high")
    engine.step()
    assert (normal.num_computed_tokens, high.num_computed_tokens) == (12, 12)
    engine.step()
    assert (normal.num_computed_tokens, high.num_computed_tokens) == (12, 24)
    order, _ = run(engine)
    assert order == ["high", "normal"]


def test_high_requests_take_several_places_in_one_step(tiny_engine) -> None:
    """A preemption for a place frees one without filling the pool, so the next high
    request behind it is admitted in the same step (a preemption for pages would stop
    admission there)."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = tiny_engine(max_num_seqs=2)
    for rid in ("low-1", "low-2"):
        engine.add_request(rid, [1, 2, 3, 4], params, priority="low")
    engine.step()
    for rid in ("high-1", "high-2"):
        engine.add_request(rid, [5, 6, 7, 8], params, priority="high")
    step = engine.step()
    assert sorted(o.request_id for o in step) == ["high-1", "high-2"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["low-1", "low-2"]
    assert engine.scheduler.num_preemptions == 2
    run(engine)
    assert engine.allocator.num_used_pages == 0


def test_only_a_high_request_takes_a_place(tiny_engine) -> None:
    """A normal request waits for a place even when low ones fill them (admitted lows
    keep the places they were promised); a high one behind it takes one at once."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine = tiny_engine(max_num_seqs=1)
    engine.add_request("low", [1, 2, 3, 4], params, priority="low")
    engine.step()
    engine.add_request("normal", [5, 6, 7, 8], params)
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["low"]
    engine.add_request("high", [9, 10, 11], params, priority="high")
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["high"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["normal", "low"]
    order, _ = run(engine)
    assert order == ["high", "normal", "low"] and engine.allocator.num_used_pages == 0


def test_each_preemption_says_why(tiny_engine) -> None:
    """A step may preempt for a place and for pages; each preemption carries its own
    reason (the engine logs it per request)."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = tiny_engine(max_num_seqs=2)
    for rid in ("low-1", "low-2"):
        engine.add_request(rid, [1, 2, 3, 4], params, priority="low")
    engine.step()
    engine.add_request("high", [5, 6, 7, 8], params, priority="high")
    plan = engine.scheduler.schedule()
    assert [(p.seq.request_id, p.reason) for p in plan.preempted] == [
        ("low-2", PreemptReason.PLACE)]

    engine = tiny_engine(num_pages=25)  # 100 tokens: 61 + 40 do not fit together
    engine.add_request("low", list(range(1, 61)), params, priority="low")
    engine.step()
    engine.add_request("high", list(range(60, 100)), params, priority="high")
    plan = engine.scheduler.schedule()
    assert [(p.seq.request_id, p.reason) for p in plan.preempted] == [
        ("low", PreemptReason.PAGES)]
