"""The per-prompt chunk cap (scheduler.py, `max_prefill_chunk_tokens`): a short prompt
behind a long one is prefilled in the same step instead of after the whole long one;
budget left over still goes to the long prompt (work-conserving) unless the step
completes a prompt (its first token would wait for the extra chunk); a prompt's rest
within a chunk and a half is taken whole when it fits the budget (its first token a
step sooner); tokens unchanged."""

from __future__ import annotations

from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
LONG = [(11 * i + 5) % 400 for i in range(300)]
SHORT = [(7 * i + 3) % 400 for i in range(20)]


def chunks(engine) -> dict[str, int]:
    plan = engine.scheduler.schedule()
    engine.scheduler.update(plan.scheduled)  # as the engine would after running them
    return {s.seq.request_id: s.num_new_tokens for s in plan.scheduled}


def test_a_short_prompt_shares_the_step_with_a_long_one(tiny_engine) -> None:
    capped = tiny_engine(max_num_batched_tokens=128, max_prefill_chunk_tokens=64)
    capped.add_request("long", LONG, GREEDY)
    capped.add_request("short", SHORT, GREEDY)
    # 64 each at most; the short prompt completes, so nothing tops up the long one
    assert chunks(capped) == {"long": 64, "short": 20}
    # the short prompt is done: budget left over tops up the long one again
    assert chunks(capped)["long"] == 128
    uncapped = tiny_engine(max_num_batched_tokens=128, max_prefill_chunk_tokens=None)
    uncapped.add_request("long", LONG, GREEDY)
    uncapped.add_request("short", SHORT, GREEDY)
    assert chunks(uncapped) == {"long": 128}  # first come takes the whole budget


def test_a_prompt_alone_still_gets_the_whole_budget(tiny_engine) -> None:
    engine = tiny_engine(max_num_batched_tokens=128, max_prefill_chunk_tokens=32)
    engine.add_request("long", LONG, GREEDY)
    assert chunks(engine) == {"long": 128}
    assert chunks(engine) == {"long": 128}
    assert chunks(engine) == {"long": 300 - 256}


def test_the_cap_changes_no_token(tiny_engine) -> None:
    prompts = [LONG, SHORT, LONG[:150], SHORT[:9]]
    free = tiny_engine(max_num_batched_tokens=96, max_prefill_chunk_tokens=None)
    capped = tiny_engine(max_num_batched_tokens=96, max_prefill_chunk_tokens=16)
    assert capped.generate(prompts, GREEDY) == free.generate(prompts, GREEDY)


def test_a_rest_within_a_chunk_and_a_half_is_taken_whole(tiny_engine) -> None:
    engine = tiny_engine(max_num_batched_tokens=256, max_prefill_chunk_tokens=64)
    engine.add_request("long", LONG, GREEDY)  # 300 tokens: capped
    engine.add_request("medium", LONG[:90], GREEDY)  # within 96: whole, its first token now
    engine.add_request("short", SHORT, GREEDY)
    assert chunks(engine) == {"long": 64, "medium": 90, "short": 20}
    # the long prompt's rest (236) is capped, then topped up: it is the only prompt left
    assert chunks(engine)["long"] == 236


def test_a_whole_rest_must_fit_the_budget(tiny_engine) -> None:
    engine = tiny_engine(max_num_batched_tokens=100, max_prefill_chunk_tokens=64)
    engine.add_request("first", LONG[:60], GREEDY)
    engine.add_request("second", LONG[:90], GREEDY)  # 90 > the 40 left: capped as before
    assert chunks(engine) == {"first": 60, "second": 40}
    engine2 = tiny_engine(max_num_batched_tokens=100, max_prefill_chunk_tokens=64)
    engine2.add_request("one", LONG[:90], GREEDY)
    engine2.add_request("two", SHORT, GREEDY)
    assert chunks(engine2) == {"one": 90, "two": 10}
