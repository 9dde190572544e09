"""Request traces for the simulator: arrivals (seconds from the first, prompt and output
tokens) from the Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`,
TIMESTAMP a date-time) or a generic CSV with the same columns (TIMESTAMP in seconds),
and the ways to fit them to a cluster:

- `length_scale`: prompt and output lengths divided by it (the Azure lengths come from
  a model far larger than SmolLM2; at least 1 token each);
- `time_scale`: time stretched by it (2: half the rate, same sequence);
- `copies`: k copies overlaid, each shifted circularly by a seeded random offset (k×
  the rate with the same length mix and burstiness; an offset of 0 for the first);
  `rate_scale` then keeps each arrival with probability rate_scale / copies (so
  copies = ceil(rate_scale) reaches any rate);
- `duration_s`: cut at this time; longer than the trace, the (scaled) trace loops,
  each loop shifted circularly by another random offset;
- `envelope`: a rate multiplier in [0, 1] over time (e.g. `day_envelope`), applied by
  seeded thinning, to turn a flat trace into a varying one.
Bad files raise `TraceError` naming the file and the line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from splitserve.errors import SplitserveError

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
Envelope = Callable[[np.ndarray], np.ndarray]


class TraceError(SplitserveError):
    def __init__(self, path: str | Path, line: int, message: str) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class Trace:
    """Arrivals sorted by time: `t_s` float64 seconds from the first arrival,
    `prompt_tokens` / `output_tokens` int64 (>= 1). `description`: how it was scaled."""

    t_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    description: str = ""

    def __len__(self) -> int:
        return int(self.t_s.shape[0])

    @property
    def span_s(self) -> float:
        return float(self.t_s[-1]) if len(self) else 0.0


@dataclass(frozen=True)
class TraceScaling:
    length_scale: float = 1.0
    time_scale: float = 1.0
    copies: int = 1
    rate_scale: float | None = None  # None: copies x the rate
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("length_scale", "time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        if self.rate_scale is not None and not 0 < self.rate_scale <= self.copies:
            raise ValueError(f"rate_scale must be in (0, copies={self.copies}], "
                             f"got {self.rate_scale}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")


def load_trace(path: str | Path) -> Trace:
    """The CSV at `path` as it is (times from its first arrival, sorted)."""
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TraceError(path, 1, "empty file: a header "
                                 f"{','.join(COLUMNS)} is expected")
            columns = [name.strip() for name in header]
            missing = [c for c in COLUMNS if c not in columns]
            if missing:
                raise TraceError(path, 1, f"missing column(s) {missing}; the header is "
                                 f"{columns}, expected {','.join(COLUMNS)}")
            index = [columns.index(c) for c in COLUMNS]
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue
                line = reader.line_num
                t, p, o = _row(path, line, row, index)
                times.append(t)
                prompts.append(p)
                outputs.append(o)
    except OSError as exc:
        raise TraceError(path, 0, f"cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(path, 0, f"not a text CSV: {exc}") from exc
    if not times:
        raise TraceError(path, 2, "no arrivals after the header")
    stamps = np.asarray(times, dtype=np.float64)
    order = np.argsort(stamps, kind="stable")
    return Trace(stamps[order] - stamps[order][0], np.asarray(prompts, dtype=np.int64)[order],
                 np.asarray(outputs, dtype=np.int64)[order], f"{Path(path).name}")


def _row(path: str | Path, line: int, row: list[str], index: list[int]) -> tuple[float, int, int]:
    if len(row) <= max(index):
        raise TraceError(path, line, f"{len(row)} column(s), {max(index) + 1} expected")
    stamp, prompt, output = (row[i].strip() for i in index)
    try:
        t = float(stamp)
    except ValueError:
        try:
            t = datetime.fromisoformat(stamp).timestamp()
        except ValueError:
            raise TraceError(path, line, f"TIMESTAMP {stamp!r} is neither seconds nor a "
                             "date-time (2023-11-16 18:15:46.68)") from None
    if not math.isfinite(t):
        raise TraceError(path, line, f"TIMESTAMP {stamp!r} is not finite")
    counts = []
    for name, cell in (("ContextTokens", prompt), ("GeneratedTokens", output)):
        try:
            value = int(cell)
        except ValueError:
            raise TraceError(path, line, f"{name} {cell!r} is not an integer") from None
        if value < 0:
            raise TraceError(path, line, f"{name} {value} is negative")
        counts.append(value)
    return t, counts[0], counts[1]


def scale_trace(trace: Trace, scaling: TraceScaling,
                envelope: Envelope | None = None, envelope_name: str = "") -> Trace:
    """`trace` fitted to a cluster as the module docstring says; seeded, so the same
    scaling gives the same arrivals."""
    rng = np.random.default_rng(scaling.seed)
    t = trace.t_s * scaling.time_scale
    prompt = np.maximum(1, np.rint(trace.prompt_tokens / scaling.length_scale)).astype(np.int64)
    output = np.maximum(1, np.rint(trace.output_tokens / scaling.length_scale)).astype(np.int64)
    # a loop's period: the span plus one mean gap, so a loop's last and the next's first
    # arrival are not on top of each other
    period = float(t[-1]) + (float(t[-1]) / max(1, len(t) - 1) if len(t) > 1 else 1.0)
    loops = 1
    if scaling.duration_s is not None:
        loops = max(1, math.ceil(scaling.duration_s / period))
    parts_t, parts_p, parts_o = [], [], []
    for copy in range(scaling.copies):
        for loop in range(loops):
            offset = 0.0 if copy == 0 and loop == 0 else float(rng.uniform(0.0, period))
            parts_t.append((t + offset) % period + loop * period)
            parts_p.append(prompt)
            parts_o.append(output)
    all_t = np.concatenate(parts_t)
    all_p, all_o = np.concatenate(parts_p), np.concatenate(parts_o)
    keep = np.ones(all_t.shape[0], dtype=bool)
    if scaling.rate_scale is not None and scaling.rate_scale < scaling.copies:
        keep &= rng.random(all_t.shape[0]) < scaling.rate_scale / scaling.copies
    if scaling.duration_s is not None:
        keep &= all_t < scaling.duration_s
    if envelope is not None:
        keep &= rng.random(all_t.shape[0]) < np.clip(envelope(all_t), 0.0, 1.0)
    all_t, all_p, all_o = all_t[keep], all_p[keep], all_o[keep]
    order = np.argsort(all_t, kind="stable")
    how = [f"lengths / {scaling.length_scale:g}", f"time x {scaling.time_scale:g}"]
    if scaling.copies > 1:
        how.append(f"{scaling.copies} copies overlaid at seeded random offsets")
    if scaling.rate_scale is not None:
        how.append(f"thinned to {scaling.rate_scale:g}x the original rate")
    if scaling.duration_s is not None:
        how.append(f"{scaling.duration_s:g} s" + (f" ({loops} loops)" if loops > 1 else ""))
    if envelope is not None:
        how.append(f"envelope {envelope_name or 'custom'}")
    return Trace(all_t[order], all_p[order], all_o[order],
                 f"{trace.description}: {', '.join(how)} (seed {scaling.seed})")


def day_envelope(period_s: float, low: float) -> Envelope:
    """A day-shaped rate multiplier: `low` at t = 0 (night), 1 at period/2 (the peak),
    a raised cosine between, repeating every `period_s`."""
    if not 0.0 <= low <= 1.0 or not period_s > 0:
        raise ValueError(f"low in [0, 1] and period_s > 0, got {low}, {period_s}")

    def envelope(t: np.ndarray) -> np.ndarray:
        return low + (1.0 - low) * 0.5 * (1.0 - np.cos(2.0 * np.pi * t / period_s))

    return envelope
