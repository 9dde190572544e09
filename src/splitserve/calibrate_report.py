"""What `splitserve calibrate` prints and draws: a table of the per-length medians, the
fitted lines and the break-even, as text or JSON, and a PNG of both curves and their
crossing.

The plot uses matplotlib (the reference Python plotting library; its Agg backend
writes PNGs with no display), imported only when a plot is drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from splitserve.calibrate import Calibration
from splitserve.planner.calibration import Line, PrefillPath

COLORS = {PrefillPath.LOCAL: "tab:blue", PrefillPath.REMOTE: "tab:orange"}


def rows(calibration: Calibration) -> list[tuple[str, ...]]:
    """The table: one row per measured length, medians of both paths in ms."""
    result = calibration.result
    local, remote = dict(result.local.points), dict(result.remote.points)
    table: list[tuple[str, ...]] = [("tokens", "local_ms", "remote_ms", "remote-local_ms")]
    for length in sorted(set(local) | set(remote)):
        cells = [local.get(length), remote.get(length)]
        diff = (cells[1] - cells[0]) if cells[0] is not None and cells[1] is not None else None
        table.append((str(length), *(f"{v:.1f}" if v is not None else "-"
                                     for v in (*cells, diff))))
    return table


def _line(line: Line) -> str:
    return f"{line.intercept_ms:.1f} ms + {line.slope_ms_per_token:.3f} ms/token"


def summary(calibration: Calibration) -> list[str]:
    result = calibration.result
    return [f"local  ttft ≈ {_line(result.local)}",
            f"remote ttft ≈ {_line(result.remote)}",
            (f"samples: {len(calibration.samples)} ({calibration.num_discarded} discarded: "
             "another path or a second attempt)"),
            result.describe(),
            calibration.note]


def to_json(calibration: Calibration, plot_path: Path | None) -> str:
    result = calibration.result

    def line(fit: Line) -> dict[str, Any]:
        return {"intercept_ms": fit.intercept_ms, "slope_ms_per_token": fit.slope_ms_per_token,
                "medians": [{"tokens": x, "ttft_ms": y} for x, y in fit.points]}

    return json.dumps({
        "break_even_tokens": result.length,
        "extrapolated": result.extrapolated,
        "measured_tokens": list(result.measured),
        "local": line(result.local),
        "remote": line(result.remote),
        "num_samples": len(calibration.samples),
        "num_discarded": calibration.num_discarded,
        "policy": {"value": (json.loads(calibration.written)
                             if calibration.written is not None else None),
                   "revision": calibration.revision, "note": calibration.note},
        "plot": str(plot_path) if plot_path is not None else None,
    }, indent=2)


def plot(calibration: Calibration, path: Path, title: str) -> None:
    """A PNG of two panels over the prompt length (log scale, as the lengths are
    geometric): above, each path's samples, medians and fitted line; below, the
    difference of the medians (remote - local: below zero, remote is faster), where
    the break-even is easy to see even when both curves nearly coincide."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    result = calibration.result
    low, high = result.measured
    if result.length:
        low, high = min(low, result.length), max(high, result.length)
    grid = [low * (high / low) ** (i / 64) for i in range(65)]
    fig, (ax, diff) = pyplot.subplots(2, 1, sharex=True, figsize=(8, 7), dpi=120,
                                      gridspec_kw={"height_ratios": [2, 1]})
    try:
        for prefill_path, fit in ((PrefillPath.LOCAL, result.local),
                                  (PrefillPath.REMOTE, result.remote)):
            color = COLORS[prefill_path]
            mine = [s for s in calibration.samples if s.path is prefill_path]
            ax.scatter([s.length for s in mine], [s.ttft_ms for s in mine], s=12, alpha=0.35,
                       color=color)
            ax.plot(*zip(*fit.points, strict=True), "o", color=color,
                    label=f"{prefill_path.value} median")
            ax.plot(grid, [fit.at(x) for x in grid], "-", color=color, alpha=0.6,
                    label=f"{prefill_path.value}: {_line(fit)}")
        remote_at = dict(result.remote.points)
        shared = [(x, remote_at[x] - y) for x, y in result.local.points if x in remote_at]
        diff.plot(*zip(*shared, strict=True), "o-", color="tab:purple",
                  label="remote - local (medians)")
        diff.axhline(0, color="black", linewidth=0.8)
        for axes in (ax, diff):
            if result.length:
                axes.axvline(result.length, linestyle="--", color="tab:gray",
                             label=f"break-even {result.length} tokens"
                                   + (" (extrapolated)" if result.extrapolated else ""))
            axes.set_xscale("log", base=2)
            axes.grid(alpha=0.3)
            axes.legend(loc="upper left", fontsize="small")
        ax.set_ylabel("time to first token (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {result.describe()}", fontsize="medium")
        diff.set_ylabel("remote - local (ms)")
        diff.set_xlabel("effective prompt length (tokens not in the prefix cache)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        pyplot.close(fig)
