"""How many of a prompt's remaining tokens one step computes: the rule the engine's
scheduler (engine/scheduler.py) and the planner's decode simulator
(planner/sim_decode.py) share. No torch here: the planner imports it."""

from __future__ import annotations


def prefill_chunk(rest: int, budget: int, cap: int) -> int:
    """`rest` tokens left, `budget` left in the step, `cap` a chunk's size: the rest
    whole when it is within a chunk and a half and fits the budget (a tail of at most
    half a chunk would otherwise cost the prompt's first token a whole step), else at
    most `cap` and the budget."""
    if rest <= budget and rest <= cap + cap // 2:
        return rest
    return min(rest, budget, cap)


def paced_cap(cap: int, budget: int, most: int) -> int:
    """A chunk cap for a step of `budget` tokens, out of `most` unpaced: the cap's
    share of the step, so a paced step still leaves room behind a long prompt."""
    return max(1, min(cap, most) * budget // most)
