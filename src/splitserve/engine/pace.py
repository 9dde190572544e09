"""How long a step takes, learned as the engine runs, and how many tokens a step may
compute to keep the time per output token its decoding sequences were promised.

A decoding sequence gets one token a step, so its time per output token (TPOT) is the
time a step takes. A step's duration grows with the tokens it computes: one for each
decoding sequence plus the prompt chunks beside them (on one CPU core with SmolLM2,
~0.55 s for 256 tokens against a 0.2 s promise). `StepPace` fits

    duration ≈ fixed + per_token × tokens

over the last `WINDOW` steps, robustly (`_robust_fit`), and inverts it:
`tokens_within(s)` is the tokens a step can take in `s` seconds. The scheduler
(engine/scheduler.py) asks it, while sequences of a class with a TPOT SLO decode,
for the tokens of a step that keeps each one's mean time per token since its first
within `MARGIN` × its SLO (one just started or behind: a step of `MARGIN` × the SLO;
one that saved time in faster steps: a bigger one), and trims the step's prompt chunks to
that (never below `MIN_PREFILL_TOKENS`, so prompts progress even when decoding alone
is slower).

Before it has seen two step sizes there is no slope to fit: it scales the median pace
(no fixed cost) instead, which errs towards small steps (a step has a fixed cost). A
budget it hands out is a new step size, so the fit gets the spread it needs from its
own use. Everything here runs on the engine's thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

WINDOW = 64  # steps: ~15 s on a CPU core at 0.2 s a step, ~1 s on a GPU
# a share of the SLO: the loop between steps and the delivery of tokens take the rest
MARGIN = 0.85
MIN_PREFILL_TOKENS = 16  # prompt tokens a paced step still takes
REFIT_EVERY = 4  # steps (a fit of 64 takes ~150 µs on this CPU; the pace drifts slowly)


class StepPace:
    def __init__(self, window: int = WINDOW) -> None:
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None  # (fixed s, s per token)
        self._unfitted = 0  # steps observed since the fit

    def observe(self, num_tokens: int, duration_s: float) -> None:
        """A step computed `num_tokens` tokens in `duration_s` seconds."""
        if num_tokens > 0 and duration_s > 0:
            self._steps.append((num_tokens, duration_s))
            self._unfitted += 1
            if self._unfitted >= REFIT_EVERY or len(self._steps) < REFIT_EVERY:
                self._fit = None

    @property
    def fit(self) -> tuple[float, float] | None:
        """(fixed seconds a step, seconds a token), or None before any step."""
        if self._fit is None and self._steps:
            self._fit = _robust_fit(self._steps)
            self._unfitted = 0
        return self._fit

    def tokens_within(self, seconds: float) -> int | None:
        """The most tokens a step computes in `seconds` at the measured pace (None:
        nothing measured yet)."""
        fit = self.fit
        if fit is None:
            return None
        fixed, per_token = fit
        return max(0, int((seconds - fixed) / per_token))


def _robust_fit(steps: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """A line that a few steps far off it do not bend (a cold first step, a stall of
    the host): the slope is the median of the slopes between every two steps of
    different sizes (Sen's slope), the fixed cost the median of what it leaves. Without
    such a line (steps of one size; a slope not rising, or so steep that the steps
    need a negative fixed cost: pairs with one outlier make all the slopes when the
    other steps have one size), the median pace and no fixed cost."""
    tokens = np.array([t for t, _ in steps], dtype=np.float64)
    durations = np.array([d for _, d in steps], dtype=np.float64)
    dt = tokens[None, :] - tokens[:, None]
    pairs = dt > 0  # each pair once, sizes different
    if pairs.any():
        slope = float(np.median((durations[None, :] - durations[:, None])[pairs] / dt[pairs]))
        fixed = float(np.median(durations - slope * tokens))
        if slope > 0 and fixed >= 0:
            return fixed, slope
    return 0.0, float(np.median(durations / tokens))
