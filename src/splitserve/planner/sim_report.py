"""What a simulation reports: per request TTFT, TPOT (mean inter-token time after the
first token; 0 for a one-token output) and end-to-end latency; SLO attainment (a request
attains when its TTFT and its TPOT both meet the planner config's SLOs), goodput
(attaining requests per second of the horizon), throughput, instance-seconds per role,
the pools over time; as JSON, a text table and a PNG (matplotlib's Agg backend,
imported only when drawing).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.config.planner import ScalingConfig
from splitserve.planner.model import Role
from splitserve.planner.sim_run import SimResult

MAX_TIMELINE_POINTS = 400  # in the JSON: enough for a day's shape, not a 17k-tick dump


def latencies(result: SimResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TTFT s, TPOT s, end-to-end s) per request."""
    ttft = result.first_s - result.arrival_s
    gaps = np.maximum(result.output_tokens - 1, 1)
    tpot = np.where(result.output_tokens > 1, (result.finish_s - result.first_s) / gaps, 0.0)
    return ttft, tpot, result.finish_s - result.arrival_s


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else 0.0


def summarize(result: SimResult, slo: ScalingConfig) -> dict[str, Any]:
    ttft, tpot, e2e = latencies(result)
    n = int(result.arrival_s.shape[0])
    done = ~np.isnan(result.finish_s)
    ttft_ok = ttft * 1e3 <= slo.ttft_slo_ms
    tpot_ok = tpot * 1e3 <= slo.tpot_slo_ms
    attained = done & ttft_ok & tpot_ok
    horizon = max(result.horizon_s, 1e-9)
    seconds = result.instance_seconds
    total = seconds[Role.PREFILL] + seconds[Role.DECODE]
    return {
        "mode": result.mode,
        "num_requests": n,
        "num_finished": int(done.sum()),
        "num_lost": int(n - done.sum()),
        "num_finished_twice": int((result.num_finished > 1).sum()),
        "horizon_s": round(horizon, 3),
        "slo": {"ttft_ms": slo.ttft_slo_ms, "tpot_ms": slo.tpot_slo_ms},
        "slo_attainment": round(float(attained.mean()) if n else 0.0, 5),
        "ttft_attainment": round(float(ttft_ok.mean()) if n else 0.0, 5),
        "tpot_attainment": round(float(tpot_ok.mean()) if n else 0.0, 5),
        "goodput_rps": round(float(attained.sum()) / horizon, 4),
        "throughput_rps": round(float(done.sum()) / horizon, 4),
        "output_tokens_per_s": round(float(result.output_tokens[done].sum()) / horizon, 2),
        "ttft_ms": {"p50": round(_pct(ttft, 50) * 1e3, 1), "p99": round(_pct(ttft, 99) * 1e3, 1)},
        "tpot_ms": {"p50": round(_pct(tpot, 50) * 1e3, 1), "p99": round(_pct(tpot, 99) * 1e3, 1)},
        "e2e_s": {"p50": round(_pct(e2e, 50), 3), "p99": round(_pct(e2e, 99), 3)},
        "remote_prefill_fraction": round(float(result.remote.mean()) if n else 0.0, 4),
        "instance_seconds": {"prefill": round(seconds[Role.PREFILL], 1),
                             "decode": round(seconds[Role.DECODE], 1),
                             "total": round(total, 1)},
        "mean_instances": round(total / horizon, 2),
        "max_instances": max((p.num_prefill + p.num_decode for p in result.timeline), default=0),
        "sim": {"wall_s": round(result.wall_s, 3), "num_events": result.num_events,
                "requests_per_s": round(n / max(result.wall_s, 1e-9), 1)},
    }


def timeline_json(result: SimResult) -> list[dict[str, float]]:
    points = result.timeline
    stride = max(1, -(-len(points) // MAX_TIMELINE_POINTS))
    return [{"t_s": round(p.t_s, 1), "prefill": p.num_prefill, "decode": p.num_decode,
             "ttft_p99_ms": round(p.ttft_p99_ms, 1), "prefill_queue": p.prefill_queue,
             "prefill_length_threshold": p.thresholds.prefill_length_threshold,
             "moderate_length_threshold": p.thresholds.moderate_length_threshold,
             "prefill_queue_max": p.thresholds.prefill_queue_max}
            for p in points[::stride]]


def to_json(summaries: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> str:
    return json.dumps({**(extra or {}), "runs": summaries}, indent=2)


def table(summaries: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One row per run: the figures to compare side by side."""
    rows: list[tuple[str, ...]] = [(
        "mode", "requests", "lost", "attain", "goodput_rps", "ttft_p50_ms", "ttft_p99_ms",
        "tpot_p99_ms", "inst_s_prefill", "inst_s_decode", "mean_inst", "sim_req_per_s")]
    for s in summaries:
        rows.append((s["mode"], str(s["num_requests"]), str(s["num_lost"]),
                     f"{s['slo_attainment']:.4f}", f"{s['goodput_rps']:.2f}",
                     f"{s['ttft_ms']['p50']:.0f}", f"{s['ttft_ms']['p99']:.0f}",
                     f"{s['tpot_ms']['p99']:.0f}", f"{s['instance_seconds']['prefill']:.0f}",
                     f"{s['instance_seconds']['decode']:.0f}", f"{s['mean_instances']:.1f}",
                     f"{s['sim']['requests_per_s']:.0f}"))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def plot(results: list[SimResult], path: Path, title: str, window_s: float | None = None) -> None:
    """Three panels over time: load (arrivals/s per window), instances per role (solid
    decode, dashed prefill, one color per run), TTFT p99 per planner tick (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    horizon = max(r.horizon_s for r in results)
    window = window_s or max(results[0].interval_s, horizon / 200)
    fig, (load, pools, ttft) = pyplot.subplots(3, 1, sharex=True, figsize=(10, 9), dpi=110)
    try:
        arrivals = results[0].arrival_s
        edges = np.arange(0.0, horizon + window, window)
        counts, _ = np.histogram(arrivals, bins=edges)
        load.step(edges[:-1] / 3600, counts / window, where="post", color="black")
        load.set_ylabel("arrivals/s")
        for i, result in enumerate(results):
            color = f"C{i}"
            t = [p.t_s / 3600 for p in result.timeline]
            pools.step(t, [p.num_decode for p in result.timeline], where="post", color=color,
                       label=f"{result.mode}: decode")
            pools.step(t, [p.num_prefill for p in result.timeline], where="post", color=color,
                       linestyle="--", label=f"{result.mode}: prefill")
            ttft.plot(t, [max(p.ttft_p99_ms, 1.0) for p in result.timeline], color=color,
                      linewidth=0.8, label=result.mode)
        pools.set_ylabel("instances")
        pools.legend(fontsize="small", ncol=2)
        ttft.set_yscale("log")
        ttft.set_ylabel("TTFT p99 per tick (ms)")
        ttft.set_xlabel("time (h)")
        ttft.legend(fontsize="small")
        for axes in (load, pools, ttft):
            axes.grid(alpha=0.3)
        load.set_title(title, fontsize="medium")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        pyplot.close(fig)
