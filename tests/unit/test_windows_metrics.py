"""The stats windows (what WorkerStats publishes) and the Prometheus exposition of one
worker's events and state, read back through prometheus-client's text parser."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from splitserve.engine.stats import EMPTY_STATS, EngineStats, StepStats
from splitserve.worker.metrics import COUNTERS, RequestMetrics, WorkerState
from splitserve.worker.observer import FirstToken, Observer
from splitserve.worker.windows import MAX_SAMPLES, SlidingWindow, WorkerWindows, percentile


def test_window_forgets_old_samples_and_stays_bounded() -> None:
    w = SlidingWindow(span_s=10.0, max_samples=100)
    for i in range(1000):
        w.add(float(i) / 100, float(i))  # 1000 samples over 10 s
    assert len(w.values(10.0)) == 100  # bounded by count
    assert w.first(25.0) == []  # all older than the span
    w.add(30.0, 7.0)
    assert w.first(30.0) == [7.0]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.5) == 0.0


_STEPS = itertools.count(1)


def _step(taken_s: float, decode: int, prefill: int, context: int, secs: float) -> EngineStats:
    return replace(EMPTY_STATS, taken_s=taken_s, num_steps=next(_STEPS), last_step=StepStats(
        num_prefill_tokens=prefill, num_decode_tokens=decode, num_context_tokens=context,
        duration_s=secs))


def test_summary_buckets_prefill_rates_and_decode_steps() -> None:
    w = WorkerWindows(span_s=60.0)
    w.prefill(1.0, 100, 0.5)  # [0, 128): 200 tok/s
    w.prefill(1.0, 100, 1.5)  # same bucket: 200 tokens / 2 s = 100 tok/s
    w.prefill(1.0, 1000, 2.0)  # [512, 2048): 500 tok/s
    w.step(_step(1.0, decode=4, prefill=0, context=400, secs=0.02))  # batch [4, 8)
    w.step(_step(1.0, decode=5, prefill=0, context=1000, secs=0.04))
    w.step(_step(1.0, decode=4, prefill=64, context=400, secs=0.5))  # mixed: not counted
    last = _step(1.0, decode=1, prefill=0, context=10, secs=0.01)  # batch [1, 2)
    w.step(last)
    w.step(replace(last, taken_s=1.5))  # a command's answer after the same step: once
    w.transfer(1.0, 4_000_000, 0.002)
    w.transfer(1.0, 2_000_000, 0.002)
    s = w.summary(2.0)
    assert [(r.min_tokens, r.max_tokens, r.tokens_per_s, r.num_samples)
            for r in s.prefill_rates] == [(0, 128, 100.0, 2), (512, 2048, 500.0, 1)]
    assert [(d.min_batch, d.max_batch, d.num_samples) for d in s.decode_steps] == \
        [(1, 2, 1), (4, 8, 2)]
    assert s.decode_steps[1].mean_ms == pytest.approx(30.0)
    assert s.decode_steps[1].mean_context_tokens == pytest.approx((100 + 200) / 2)
    assert s.transfer_bytes_per_s == pytest.approx(1.5e9)
    # all lengths together: 1200 tokens over the 60 s window, in 4 s of prefill, 3 prompts
    assert s.prefill_tokens_per_s == pytest.approx(20.0)
    assert s.prefill_rate_tokens_per_s == pytest.approx(300.0)
    assert s.mean_prefill_tokens == pytest.approx(400.0)
    assert w.summary(100.0).prefill_rates == ()  # out of the window
    assert w.summary(100.0).prefill_tokens_per_s == 0.0


def _families(metrics: RequestMetrics) -> dict[str, dict[tuple, float]]:
    """metric sample name → {labels (sorted, without model_name): value}"""
    out: dict[str, dict[tuple, float]] = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items()
                                  if k != "model_name"))
            out.setdefault(sample.name, {})[labels] = sample.value
    return out


def test_events_and_state_reach_the_exposition() -> None:
    engine = replace(EMPTY_STATS, num_running=3, num_waiting=2, num_remote_pending=1,
                     num_pages_used=30, num_pages_free=60, num_pages_quarantined=10,
                     num_pages_total=100, num_preemptions=4, max_num_seqs=8,
                     last_step=StepStats(num_prefill_tokens=40, num_decode_tokens=3,
                                         token_budget=45))
    counters = dict.fromkeys(COUNTERS, 0) | {"num_offload_remote": 5, "num_fallbacks": 2}
    metrics = RequestMetrics("tiny", lambda: WorkerState(engine, counters, 7, 11, 1))
    windows = WorkerWindows()
    observer = Observer(metrics, windows)
    first = FirstToken(start_s=10.0, at_s=10.5, queue_s=0.1, prefill_s=0.4, path="remote",
                       num_prefill_tokens=200)
    observer.first_token(first, num_tokens=1)
    observer.tokens(10.6, gap_s=0.1, num_tokens=1)
    observer.tokens(10.8, gap_s=0.2, num_tokens=2)  # two tokens in one chunk: 0.1 s each
    observer.finished(10.8, first, reason="length", num_prompt_tokens=200,
                      num_output_tokens=4)
    # TPOT: 3 tokens after the first in 0.3 s
    assert windows.summary(11.0).tpot_p99_ms == pytest.approx(100.0)
    observer.transfer(num_bytes=1 << 20, duration_s=0.003)
    f = _families(metrics)
    assert f["splitserve:time_to_first_token_seconds_count"][()] == 1
    assert f["splitserve:time_to_first_token_seconds_sum"][()] == pytest.approx(0.5)
    assert f["splitserve:inter_token_latency_seconds_count"][()] == 3
    assert f["splitserve:inter_token_latency_seconds_sum"][()] == pytest.approx(0.3)
    assert f["splitserve:e2e_request_latency_seconds_sum"][()] == pytest.approx(0.8)
    assert f["splitserve:request_queue_time_seconds_count"][()] == 1
    assert f["splitserve:request_prefill_time_seconds_count"][(("path", "remote"),)] == 1
    assert f["splitserve:request_success_total"][(("finished_reason", "length"),)] == 1
    assert f["splitserve:prompt_tokens_total"][()] == 200
    assert f["splitserve:generation_tokens_total"][()] == 4
    assert f["splitserve:kv_transfer_bytes_sum"][()] == 1 << 20
    assert f["splitserve:num_requests_running"][()] == 3
    assert f["splitserve:num_requests_waiting"][()] == 3  # local 2 + remote pending 1
    assert f["splitserve:kv_cache_usage_perc"][()] == pytest.approx(0.4)
    assert f["splitserve:kv_pages"][(("state", "quarantined"),)] == 10
    assert f["splitserve:remote_queue_depth"][()] == 7
    assert f["splitserve:num_preemptions_total"][()] == 4
    assert f["splitserve:engine_step_token_budget"][()] == 45  # a paced step (engine/pace.py)
    assert f["splitserve:offload_decisions_remote_total"][()] == 5
    assert f["splitserve:remote_fallbacks_total"][()] == 2
    assert f["splitserve:kv_transfers_total"][()] == 11
    # every table counter is exposed, each name once
    names = [name for name, _ in COUNTERS.values()]
    assert len(set(names)) == len(names)
    assert all(f"splitserve:{n}_total" in f for n in names)


def test_windows_are_bounded_by_count() -> None:
    w = WorkerWindows(span_s=1e9)
    for i in range(3 * MAX_SAMPLES):
        w.ttft.add(float(i), 0.1)
    assert len(w.ttft.values(float(3 * MAX_SAMPLES))) == MAX_SAMPLES


def test_dashboard_queries_only_exposed_metrics() -> None:
    """configs/grafana-dashboard.json may not drift from what the workers expose."""
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / "grafana-dashboard.json"
    exprs = [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"splitserve:[a-z0-9_]+", e)}
    counters = dict.fromkeys(COUNTERS, 0)
    metrics = RequestMetrics("m", lambda: WorkerState(EMPTY_STATS, counters, 0, 0, 0))
    exposed = set(_families(metrics))
    assert used and used <= exposed, sorted(used - exposed)
