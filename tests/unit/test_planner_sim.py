"""The trace simulator (planner/sim*.py): hand-computed latencies on one decode
instance, the remote path, conservation, and `--static` parsing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from splitserve.config.planner import PlannerConfig, ScalingConfig
from splitserve.planner.profile import Profile
from splitserve.planner.sim import SimSettings, StaticError, parse_pd, simulate, summarize
from splitserve.planner.sim_report import latencies
from splitserve.planner.trace import Trace
from splitserve.routing.offload import RoutingConfig

# 1 ms per prompt token, 10 ms per decode step whatever the batch: times add up by hand
PROFILE = Profile(prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_ms_per_seq=0.0,
                  kv_bytes_per_token=1000, transfer_bytes_per_s=1e6, remote_overhead_ms=20.0,
                  queue_overhead_ms=5.0, max_num_batched_tokens=256,
                  max_prefill_chunk_tokens=128)
LOCAL = PlannerConfig(routing=RoutingConfig(enable_remote_prefill=False))


def _trace(rows: list[tuple[float, int, int]]) -> Trace:
    t, p, o = zip(*rows, strict=True)
    return Trace(np.array(t, dtype=np.float64), np.array(p, dtype=np.int64),
                 np.array(o, dtype=np.int64))


def _run(rows: list[tuple[float, int, int]], config: PlannerConfig = LOCAL,
         static: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    result = simulate(_trace(rows), SimSettings(config, PROFILE, static=static))
    assert result.num_finished.tolist() == [1] * len(rows)
    return latencies(result)


def test_two_local_prompts_share_steps() -> None:
    # A: step 1 prefills its 100 tokens (0-0.100 s, first token); B arrives meanwhile;
    # step 2: A's 2nd token (10 ms) + B's 50-token chunk (50 ms) ends at 0.160 (B's first
    # token); step 3 (10 ms): A's 3rd and B's 2nd token, both finish at 0.170.
    ttft, tpot, e2e = _run([(0.0, 100, 3), (0.05, 50, 2)])
    assert ttft == pytest.approx([0.100, 0.110])
    assert tpot == pytest.approx([0.035, 0.010])
    assert e2e == pytest.approx([0.170, 0.120])


def test_arrival_cuts_a_decode_epoch_at_the_next_step() -> None:
    # A: prefill 10 ms, then decode steps of 10 ms from 0.010; C arrives at 0.023 and
    # joins at the boundary 0.030; that step has A's token (10 ms) + C's 20 tokens
    # (20 ms), ends 0.060 with C's only token; A's 5th token at 0.070.
    ttft, tpot, e2e = _run([(0.0, 10, 5), (0.023, 20, 1)])
    assert ttft == pytest.approx([0.010, 0.037])
    assert tpot == pytest.approx([0.015, 0.0])
    assert e2e == pytest.approx([0.070, 0.037])


def test_long_prompt_is_chunked_and_shares_the_budget() -> None:
    # 300 tokens: steps of 256 (budget, alone: capped 128 then topped up) and 44 tokens
    ttft, _, _ = _run([(0.0, 300, 1)])
    assert ttft == pytest.approx([0.300])


def test_tpot_pacing_trims_the_chunks_beside_a_decoding_sequence() -> None:
    # A promised 100 ms a token, paced at 85: A's prefill 10 ms (first token 0.010); B
    # (200 tokens) joins at 0.010 beside A's decode (10 ms), so each step takes 75 of
    # its tokens (85 ms): 0.095, 0.180, then its last 50 (60 ms) with its first token
    # at 0.240 (unpaced: all 200 in one 210 ms step, 0.220); A's last token 0.250.
    paced = dataclasses.replace(PROFILE, tpot_slo_ms=100.0)
    result = simulate(_trace([(0.0, 10, 5), (0.005, 200, 1)]),
                      SimSettings(LOCAL, paced, static=(0, 1)))
    ttft, tpot, e2e = latencies(result)
    assert ttft == pytest.approx([0.010, 0.235])
    assert tpot == pytest.approx([0.060, 0.0])
    assert e2e == pytest.approx([0.250, 0.235])
    assert _run([(0.0, 10, 5), (0.005, 200, 1)])[0] == pytest.approx([0.010, 0.215])


def test_remote_prefill_path() -> None:
    # fetch 5 ms + prefill 100 ms, transfer 100 x 1000 B at 1 MB/s = 100 ms, KVReady
    # 20 ms: first token at 0.225; two decode steps of 10 ms
    config = PlannerConfig(routing=RoutingConfig(prefill_length_threshold=0))
    ttft, tpot, e2e = _run([(0.0, 100, 3)], config, static=(1, 1))
    assert ttft == pytest.approx([0.225])
    assert tpot == pytest.approx([0.010])
    assert e2e == pytest.approx([0.245])


def test_prefill_queue_is_fcfs_over_the_pool() -> None:
    config = PlannerConfig(routing=RoutingConfig(prefill_length_threshold=0))
    ttft, _, _ = _run([(0.0, 100, 1), (0.0, 100, 1)], config, static=(1, 1))
    # the second waits for the first's 105 ms of prefill
    assert ttft == pytest.approx([0.225, 0.330])


def test_conservation_and_summary_under_load() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    rows = sorted(zip(rng.uniform(0, 300, n).tolist(), rng.integers(1, 400, n).tolist(),
                      rng.integers(1, 60, n).tolist(), strict=True))
    config = PlannerConfig(interval_s=5.0)
    result = simulate(_trace(rows), SimSettings(config, PROFILE, initial=(1, 1)))
    assert result.num_finished.tolist() == [1] * n  # none lost, none twice
    summary = summarize(result, config.scaling)
    assert summary["num_lost"] == 0 and summary["num_finished_twice"] == 0
    assert 0.0 < summary["remote_prefill_fraction"] < 1.0
    assert summary["instance_seconds"]["total"] == pytest.approx(
        summary["instance_seconds"]["prefill"] + summary["instance_seconds"]["decode"], abs=0.2)


def test_static_pools_cost_their_size_times_the_horizon() -> None:
    result = simulate(_trace([(0.0, 10, 2), (100.0, 10, 2)]),
                      SimSettings(LOCAL, PROFILE, static=(2, 3)))
    seconds = summarize(result, LOCAL.scaling)["instance_seconds"]
    assert (seconds["prefill"], seconds["decode"]) == (200.0, 300.0)


@pytest.mark.parametrize("text", ["3", "a:b", "-1:2", "2:0", "1:2:3", ""])
def test_static_parsing_errors(text: str) -> None:
    with pytest.raises(StaticError, match="P:D"):
        parse_pd(text)


def test_static_parsing() -> None:
    assert parse_pd("0:4") == (0, 4)
    assert parse_pd("12:30") == (12, 30)


def test_role_flips_keep_the_total() -> None:
    rows = [(i * 0.05, 200, 20) for i in range(4000)]
    config = PlannerConfig(interval_s=5.0, scaling=ScalingConfig(min_prefill=0))
    result = simulate(_trace(rows), SimSettings(config, PROFILE, initial=(1, 5),
                                                fixed_total=True))
    assert result.num_finished.tolist() == [1] * len(rows)
    assert {p.num_prefill + p.num_decode for p in result.timeline} == {6}
    # the policy moved workers between the roles (here: decode's TPOT SLO, broken by the
    # local prefill chunks, wins the prefill worker over); the total never changed
    assert len({(p.num_prefill, p.num_decode) for p in result.timeline}) > 1
