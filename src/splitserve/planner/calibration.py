"""Break-even of remote prefill: from measured times of both paths, the effective prompt
length from which a remote prefill gives the first token sooner than a local one.

What is measured (by `splitserve calibrate` on a running cluster, and later from live
stats by the planner) is one `Sample` per request: its path, its effective prompt
length (prompt tokens not served from the prefix cache) and its time to first token,
which for a remote prefill includes the job's queue wait, the prefill, the KV transfer
and the notification. Each path is summarized by its per-length medians (one slow
request on a noisy machine moves a mean, not a median), and by a least-squares line
through them, `ttft_ms = intercept_ms + slope_ms_per_token * length`:
- the local curve starts near zero and rises with the decode worker's prefill rate;
- the remote curve starts higher (queue + transfer + notification overhead) and rises
  with the prefill pool's rate (plus transfer per token).
The break-even is the length from which remote stays faster: where the remote medians
drop below the local ones for the last time, interpolated linearly between the two
measured lengths around it (no model of the curves' shape: prefill is not linear in
length, attention grows with its square). Beyond the measured lengths the lines
extrapolate: if remote is slower at the largest length measured, the lines' crossing
(if they cross further out) is the break-even, marked `extrapolated`; if remote is
faster at every measured length, it is the smaller of the smallest length and the
lines' crossing. None: remote is not expected to be faster at any length.

Pure functions, no I/O and no clock: unit-tested in tests/unit/test_calibration.py.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

MAX_THRESHOLD = 1 << 24  # RoutingConfig's bound on prefill_length_threshold


class PrefillPath(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclass(frozen=True)
class Sample:
    """One measured request: `length` effective prompt tokens, `ttft_ms` to its first token."""

    path: PrefillPath
    length: int
    ttft_ms: float


@dataclass(frozen=True)
class Line:
    """`ttft_ms = intercept_ms + slope_ms_per_token * length`, fitted to `points`
    ((length, median ttft_ms) per measured length, ascending)."""

    intercept_ms: float
    slope_ms_per_token: float
    points: tuple[tuple[int, float], ...]

    def at(self, length: float) -> float:
        return self.intercept_ms + self.slope_ms_per_token * length


@dataclass(frozen=True)
class BreakEven:
    """The two fitted lines and where they cross.

    `length`: the smallest effective prompt length (tokens) from which remote is
    expected to be faster, rounded up; 0 when remote is faster at every length; None
    when it is faster at none. `extrapolated`: the crossing lies outside the measured
    lengths (`measured`, the smallest and largest)."""

    local: Line
    remote: Line
    length: int | None
    measured: tuple[int, int]

    @property
    def extrapolated(self) -> bool:
        return self.length is not None and not (
            self.measured[0] <= self.length <= self.measured[1])

    def describe(self) -> str:
        low, high = self.measured
        if self.length is None:
            return (f"remote prefill is slower than local at {high} tokens, the largest "
                    "measured, and the lines do not cross beyond: no break-even")
        if self.length == 0:
            return "remote prefill is faster than local at every length: break-even 0 tokens"
        where = (f", extrapolated beyond the measured {low}-{high} tokens"
                 if self.extrapolated else "")
        return f"break-even at {self.length} effective prompt tokens{where}"


def medians(samples: Iterable[Sample], path: PrefillPath) -> tuple[tuple[int, float], ...]:
    """(length, median ttft_ms) for each length measured on `path`, ascending."""
    by_length: dict[int, list[float]] = defaultdict(list)
    for sample in samples:
        if sample.path is path:
            by_length[sample.length].append(sample.ttft_ms)
    return tuple((length, statistics.median(times))
                 for length, times in sorted(by_length.items()))


def fit_line(points: tuple[tuple[int, float], ...]) -> Line:
    """Least-squares line through `points`; ValueError with fewer than two lengths."""
    if len(points) < 2:
        raise ValueError(f"a line needs samples at two lengths or more, got {len(points)}")
    slope, intercept = statistics.linear_regression([float(x) for x, _ in points],
                                                    [y for _, y in points])
    return Line(intercept, slope, points)


def crossing(local: Line, remote: Line) -> int | None:
    """The smallest length >= 0 from which `remote` lies below `local` (rounded up);
    None when it never does."""
    gain_at_zero = local.intercept_ms - remote.intercept_ms  # > 0: remote faster at 0
    gain_per_token = local.slope_ms_per_token - remote.slope_ms_per_token
    if gain_per_token <= 0:  # the lines part (or run parallel) as length grows
        return 0 if gain_at_zero > 0 else None
    if gain_at_zero >= 0:
        return 0
    return min(MAX_THRESHOLD, math.ceil(-gain_at_zero / gain_per_token))


def break_even(samples: Iterable[Sample]) -> BreakEven:
    """Medians, lines and the break-even of both paths; ValueError when a path lacks two
    lengths, or the paths share fewer than two."""
    samples = tuple(samples)
    local = fit_line(medians(samples, PrefillPath.LOCAL))
    remote = fit_line(medians(samples, PrefillPath.REMOTE))
    remote_at = dict(remote.points)
    gains = [(x, y - remote_at[x]) for x, y in local.points if x in remote_at]
    if len(gains) < 2:
        raise ValueError(f"the paths share {len(gains)} measured length(s); two are needed")
    return BreakEven(local, remote, _break_even(gains, local, remote),
                     (gains[0][0], gains[-1][0]))


def _break_even(gains: list[tuple[int, float]], local: Line, remote: Line) -> int | None:
    """From `gains` ((length, local - remote median ms), ascending): where the gain turns
    positive for the last time, interpolated; beyond the measured lengths, the lines."""
    lines = crossing(local, remote)
    if gains[-1][1] <= 0:  # remote not faster at the largest length measured
        return lines if lines is not None and lines > gains[-1][0] else None
    slower = [i for i, (_, gain) in enumerate(gains) if gain <= 0]
    if not slower:  # faster at every measured length
        return min(gains[0][0], lines if lines is not None else gains[0][0])
    (x0, g0), (x1, g1) = gains[slower[-1]], gains[slower[-1] + 1]
    return math.ceil(x0 + (x1 - x0) * -g0 / (g1 - g0))
