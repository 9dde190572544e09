"""TPOT pacing (engine/pace.py, scheduler.py): the step-time fit, and the budget it sets
while a class with a TPOT SLO decodes: prompt chunks trimmed to fit the SLO, never below
MIN_PREFILL_TOKENS, no trimming for a class without one; tokens unchanged."""

from __future__ import annotations

import pytest

from splitserve.config.schema import PerClass
from splitserve.engine.pace import MARGIN, MIN_PREFILL_TOKENS, WINDOW, StepPace
from splitserve.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
LONG = [(11 * i + 5) % 400 for i in range(300)]
SHORT = [(7 * i + 3) % 400 for i in range(8)]


def linear(pace: StepPace, fixed: float, per_token: float, sizes=range(16, 257, 16)) -> None:
    for n in sizes:
        pace.observe(n, fixed + per_token * n)


def test_the_fit_recovers_a_linear_pace_and_inverts_it() -> None:
    pace = StepPace()
    assert pace.tokens_within(1.0) is None  # nothing measured: no opinion
    linear(pace, 0.05, 0.002)
    fixed, per_token = pace.fit
    assert fixed == pytest.approx(0.05) and per_token == pytest.approx(0.002)
    assert pace.tokens_within(0.17) in (59, 60)  # (0.17 - 0.05) / 0.002, rounded down
    assert pace.tokens_within(0.01) == 0  # not even the fixed cost


def test_one_step_size_scales_the_median_pace_and_empty_steps_teach_nothing() -> None:
    pace = StepPace()
    pace.observe(0, 0.3)  # no tokens (nothing to learn) ...
    pace.observe(10, 0.0)  # ... or no time
    assert pace.fit is None
    for duration in (0.5, 0.5, 0.6):
        pace.observe(100, duration)
    assert pace.fit == (0.0, pytest.approx(0.005))
    assert pace.tokens_within(0.2) == 40


def test_a_cold_first_step_bends_neither_a_line_nor_a_pace() -> None:
    """The engine's first step on SmolLM2 (256 tokens) took 1.73 s, the next ones
    (~23 tokens) ~0.08 s: as the only step of another size, it alone made every slope."""
    pace = StepPace()
    pace.observe(256, 1.73)
    for _ in range(20):
        pace.observe(23, 0.02 + 0.003 * 23)
    assert pace.fit == (0.0, pytest.approx(0.089 / 23))  # not 0.0069 s a token
    linear(pace, 0.02, 0.003)  # steps of many sizes: the line, the cold step ignored
    assert pace.fit == (pytest.approx(0.02), pytest.approx(0.003))


def test_the_window_is_bounded_and_follows_the_recent_pace() -> None:
    pace = StepPace()
    for _ in range(40):
        linear(pace, 0.5, 0.01)  # a slow past: 640 steps
    linear(pace, 0.05, 0.002, sizes=list(range(16, 257, 16)) * 4)  # 64 recent steps
    assert len(pace._steps) == WINDOW
    assert pace.fit == (pytest.approx(0.05), pytest.approx(0.002))


def paced(tiny_engine, fixed: float, per_token: float, slo=PerClass(high=0.2, normal=0.2)):
    engine = tiny_engine(max_num_batched_tokens=256, max_prefill_chunk_tokens=None,
                         tpot_slo_s=slo)
    engine.pace_as = (fixed, per_token)
    return engine


def decode_then_long(engine, priority: str) -> dict[str, int]:
    """A short request decoding, then a long prompt: the tokens of the next step, at
    the pace `engine.pace_as` (not the tiny model's few milliseconds)."""
    short = engine.add_request("short", SHORT, GREEDY, priority=priority)
    engine.step()  # prefilled, first token
    engine.scheduler.pace = StepPace()
    linear(engine.scheduler.pace, *engine.pace_as)
    engine.add_request("long", LONG, GREEDY, priority="low")
    plan = engine.scheduler.schedule(now=short.first_token_s)  # no time saved yet
    engine.scheduler.update(plan.scheduled)
    return {s.seq.request_id: s.num_new_tokens for s in plan.scheduled}


def test_a_decoding_class_with_a_tpot_slo_trims_the_prompt_chunks(tiny_engine) -> None:
    fits = StepPace()
    linear(fits, 0.05, 0.002)
    fits = fits.tokens_within(MARGIN * 0.2)  # ~60 tokens in 0.17 s
    assert decode_then_long(paced(tiny_engine, 0.05, 0.002), "high") == {
        "short": 1, "long": fits - 1}
    assert decode_then_long(paced(tiny_engine, 0.05, 0.002), "normal") == {
        "short": 1, "long": fits - 1}


def test_a_paced_step_still_has_room_for_a_short_prompt_behind_a_long_one(tiny_engine) -> None:
    """The cap shrinks with the budget (128 of 256 → 30 of 60): the long prompt, already
    running, leaves the rest to the short one queued behind it."""
    engine = tiny_engine(max_num_batched_tokens=256, max_prefill_chunk_tokens=128,
                         tpot_slo_s=PerClass(high=0.2, normal=0.2))
    decoding = engine.add_request("decoding", SHORT, GREEDY, priority="high")
    engine.add_request("long", LONG, GREEDY, priority="low")
    engine.step()  # the short prompt whole, the long one's first chunk
    other = [t + 1 for t in SHORT]  # not in the prefix cache
    engine.add_request("short", other, GREEDY, priority="low")
    engine.scheduler.pace = StepPace()
    linear(engine.scheduler.pace, 0.05, 0.002)  # ~60 tokens in 0.17 s
    plan = engine.scheduler.schedule(now=decoding.first_token_s)
    chunks = {s.seq.request_id: s.num_new_tokens for s in plan.scheduled}
    cap = 128 * plan.budget // 256
    assert 28 <= cap <= 30
    assert chunks == {"decoding": 1, "long": cap, "short": len(other)}


def test_time_saved_in_faster_steps_buys_a_bigger_step_and_time_lost_no_smaller(
        tiny_engine) -> None:
    """The budget keeps each sequence's mean time per token since its first within
    0.85 × its SLO: 10 tokens after the first in 1 s at 0.2 s promised leave 0.87 s; a
    sequence behind gets the step of one just started (not the floor for as long as it
    takes to catch up)."""
    engine = paced(tiny_engine, 0.05, 0.002)
    short = engine.add_request("short", SHORT, GREEDY, priority="high")
    for _ in range(11):
        engine.step()  # its first token and 10 more
    engine.scheduler.pace = StepPace()
    linear(engine.scheduler.pace, 0.05, 0.002)
    engine.add_request("long", LONG, GREEDY, priority="low")
    ahead = engine.scheduler.schedule(now=short.first_token_s + 1.0)
    assert ahead.budget == 256  # (0.85 × 0.2 × 11 - 1.0 - 0.05) / 0.002 > 256
    engine.scheduler.update(ahead.scheduled)
    behind = engine.scheduler.schedule(now=short.first_token_s + 3.0)  # 1.7 s allowed
    assert behind.budget == StepPace.tokens_within(engine.scheduler.pace, MARGIN * 0.2)


def test_a_class_without_a_tpot_slo_takes_the_whole_budget(tiny_engine) -> None:
    assert decode_then_long(paced(tiny_engine, 0.05, 0.002), "low") == {
        "short": 1, "long": 255}
    unpaced = paced(tiny_engine, 0.05, 0.002, slo=PerClass())
    assert decode_then_long(unpaced, "high") == {"short": 1, "long": 255}


def test_prompts_still_progress_when_decoding_alone_misses_the_slo(tiny_engine) -> None:
    chunk = decode_then_long(paced(tiny_engine, 0.5, 0.002), "high")
    assert chunk == {"short": 1, "long": MIN_PREFILL_TOKENS}


def test_a_paced_engine_measures_itself_and_changes_no_token(tiny_engine) -> None:
    """With a promise no step can keep (1 µs), every step beside a decoding high
    request takes the floor; the tokens equal an unpaced engine's."""
    prompts = [SHORT, LONG, LONG[:150]]
    priorities = ["high", "normal", "low"]
    free = tiny_engine(max_num_batched_tokens=256, tpot_slo_s=PerClass())
    expected = [free.generate([p], GREEDY)[0] for p in prompts]
    engine = tiny_engine(max_num_batched_tokens=256, tpot_slo_s=PerClass(high=1e-6),
                         num_pages=256)  # room for all three: no preemption
    seqs = [engine.add_request(f"r{i}", p, GREEDY, priority=c)
            for i, (p, c) in enumerate(zip(prompts, priorities))]
    steps = []
    while engine.has_unfinished:
        engine.step()
        steps.append(engine.last_step)
        assert steps[-1].num_prefill_tokens <= steps[-1].token_budget
    assert [s.output_token_ids for s in seqs] == expected
    # the first step measured the pace; in the next 39 the high request decoded beside
    # the other prompts (then decoding too), each step's prompt tokens at the floor
    assert steps[0].token_budget == 256
    paced_steps = steps[1:40]
    assert all(s.token_budget - s.num_decode_tokens == MIN_PREFILL_TOKENS
               for s in paced_steps), steps
    assert sum(s.num_prefill_tokens for s in paced_steps) == 300 + 150 - 128 - 120
    assert steps[-1].token_budget == 256  # the high request done: no promise to keep
