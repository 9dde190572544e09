"""The planner's policy (planner/policy.py, scaling.py, thresholds.py): exact plans from
hand-built observations, clock given by the observation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from splitserve.config.planner import PolicyConfig, ScalingConfig, ThresholdConfig
from splitserve.planner.model import Observation, Role, Thresholds, WorkerLoad
from splitserve.planner.policy import PlannerPolicy
from splitserve.planner.thresholds import retune

THRESHOLDS = Thresholds(prefill_length_threshold=128, moderate_length_threshold=48,
                        prefill_queue_max=16)
NO_THRESHOLDS = ThresholdConfig(enabled=False)


def decode(i: int, tps: float = 40.0, **kw: float) -> WorkerLoad:
    return WorkerLoad(f"d{i}", Role.DECODE, decode_tokens_per_s=tps, **kw)  # type: ignore[arg-type]


def prefill(i: int, **kw: float) -> WorkerLoad:
    return WorkerLoad(f"p{i}", Role.PREFILL, **kw)  # type: ignore[arg-type]


def obs(now: float, *workers: WorkerLoad, queue: int = 0,
        thresholds: Thresholds = THRESHOLDS) -> Observation:
    return Observation(now, workers, queue, thresholds, kv_bytes_per_token=1000)


def policy(fixed_total: int | None = None, **scaling: float) -> PlannerPolicy:
    return PlannerPolicy(PolicyConfig(ScalingConfig(**scaling), NO_THRESHOLDS),  # type: ignore[arg-type]
                         fixed_total=fixed_total)


def test_decode_within_tolerance_stays() -> None:
    plan = policy(min_prefill=0).step(obs(0, decode(0, 44), decode(1, 38)))
    assert (plan.num_decode, plan.num_prefill) == (2, 0)
    assert any("within 15% of the target 40" in r for r in plan.reasons)


def test_decode_above_target_scales_up_by_the_gain_and_the_step_bound() -> None:
    # 2 instances at 100 tok/s, target 40: proportional count 5, gain 0.5 -> 2 + 1.5 -> 4
    plan = policy(max_step=8).step(obs(0, decode(0, 100), decode(1, 100)))
    assert plan.num_decode == 4
    # the same, at most 1 per change
    assert policy(max_step=1).step(obs(0, decode(0, 100), decode(1, 100))).num_decode == 3


def test_decode_below_target_scales_down_cautiously() -> None:
    # 4 instances at 20 tok/s: proportional 2, gain 0.5 -> 3 (rounded)
    workers = [decode(i, 20) for i in range(4)]
    assert policy().step(obs(0, *workers)).num_decode == 3
    # 4 at 30 tok/s: 4 + 0.5 * (3 - 4) = 3.5 -> rounds to 4 (banker's: 4): no change
    workers = [decode(i, 30) for i in range(4)]
    assert policy().step(obs(0, *workers)).num_decode == 4


def test_a_tpot_violation_adds_decode_and_forbids_scaling_it_down() -> None:
    # d0 finished nothing in its window: its inter-token p99 stands in for TPOT
    workers = [decode(0, 5, itl_p99_ms=350), decode(1, 5)]
    plan = policy().step(obs(0, *workers))
    assert plan.num_decode == 3
    assert any("TPOT SLO violated on 1 of 2: d0 TPOT p99 350 ms" in r for r in plan.reasons)
    # a request's TPOT, when measured, is what the SLO is about (one slow step is not)
    fine = [decode(0, 5, itl_p99_ms=350, tpot_p99_ms=120), decode(1, 5)]
    assert policy().step(obs(0, *fine)).num_decode < 2


def test_a_violation_needs_a_share_of_the_workers() -> None:
    # 1 of 20 workers over the TPOT SLO is noise at violation_fraction 0.1; 2 of 20 is not
    quiet = [decode(i, 40) for i in range(18)]
    one = policy().step(obs(0, decode(18, 40, tpot_p99_ms=300), decode(19, 40), *quiet))
    assert one.num_decode == 20 and not any("violated" in r for r in one.reasons)
    two = policy().step(obs(0, decode(18, 40, tpot_p99_ms=300),
                            decode(19, 40, tpot_p99_ms=250), *quiet))
    assert two.num_decode == 21
    assert any("TPOT SLO violated on 2 of 20: d18 TPOT p99 300 ms" in r for r in two.reasons)


def test_ttft_violation_is_blamed_on_prefill_when_its_queue_has_a_backlog() -> None:
    workers = (decode(0, 40, ttft_p99_ms=5000),
               prefill(0, prefill_tokens_per_s=100, prefill_rate_tokens_per_s=1000,
                       mean_prefill_tokens=500, num_running=1))
    with_backlog = policy().step(obs(0, *workers, queue=4))
    assert (with_backlog.num_decode, with_backlog.num_prefill) == (1, 2)
    without = policy().step(obs(0, *workers, queue=0))
    assert (without.num_decode, without.num_prefill) == (2, 1)


def test_floors_kv_in_use_and_busy_prefill() -> None:
    # idle by tokens/s, but 2.3 workers' worth of KV pages in use: 3 stay
    workers = [decode(i, 0, kv_usage=0.77) for i in range(3)]
    workers.append(prefill(0, num_running=1, prefill_rate_tokens_per_s=1000))
    plan = policy(max_step=8).step(obs(0, *workers))
    assert (plan.num_decode, plan.num_prefill) == (3, 1)


def test_prefill_follows_its_measured_load_and_the_ratio_band() -> None:
    # 1400 tok/s prefilled at 1000 tok/s per instance x 0.7 -> 2 instances
    workers = [decode(i) for i in range(4)] + [
        prefill(0, prefill_tokens_per_s=1400, prefill_rate_tokens_per_s=1000)]
    assert policy(max_step=8).step(obs(0, *workers)).num_prefill == 2
    capped = policy(max_step=8, pd_ratio_max=0.25).step(obs(0, *workers))
    assert capped.num_prefill == 1
    assert any("capped at 1 by pd_ratio_max 0.25" in r for r in capped.reasons)
    raised = policy(max_step=8, pd_ratio_min=1.0).step(obs(0, *workers))
    assert raised.num_prefill == 4


def test_cooldowns_hold_a_target_and_release_it() -> None:
    p = policy(max_step=1, scale_up_cooldown_s=30, scale_down_cooldown_s=120)
    hot = [decode(0, 200)]
    assert p.step(obs(0, *hot)).num_decode == 2
    held = p.step(obs(10, *hot))  # still one worker observed: the target stays 2
    assert held.num_decode == 2
    assert any("waits: cooldown 30 s" in r for r in held.reasons)
    assert p.step(obs(31, *hot)).num_decode == 3
    cold = [decode(i, 1) for i in range(3)]
    assert p.step(obs(100, *cold)).num_decode == 3  # down waits 120 s after the change
    assert p.step(obs(152, *cold)).num_decode == 2


def test_fixed_total_flips_one_worker_and_keeps_the_sum() -> None:
    p = policy(fixed_total=3, min_prefill=0, scale_up_cooldown_s=0, scale_down_cooldown_s=60)
    burst = (decode(0, 40), decode(1, 40), decode(2, 40))
    plan = p.step(obs(0, *burst, queue=6))  # backlog, prefill rate from decode workers
    assert (plan.num_prefill, plan.num_decode) == (0, 3)  # no rate measured anywhere yet
    measured = tuple(replace(w, prefill_rate_tokens_per_s=500) for w in burst)
    plan = p.step(obs(5, *measured, queue=6))
    assert (plan.num_prefill, plan.num_decode) == (1, 2)
    # decode now wants more; the prefill -> decode flip waits out decode's down cooldown
    quiet = (decode(0, 40, prefill_rate_tokens_per_s=500), decode(1, 40),
             prefill(0, prefill_rate_tokens_per_s=500))
    plan = p.step(obs(20, *quiet))
    assert (plan.num_prefill, plan.num_decode) == (1, 2)
    assert any("waits: cooldown 60 s" in r for r in plan.reasons)
    plan = p.step(obs(70, *quiet))
    assert (plan.num_prefill, plan.num_decode) == (0, 3)


def test_same_observations_same_plans() -> None:
    sequence = [obs(t, decode(0, 40 + t), prefill(0, prefill_tokens_per_s=10 * t,
                                                  prefill_rate_tokens_per_s=800))
                for t in range(0, 300, 7)]
    a, b = policy(), policy()
    assert [a.step(o) for o in sequence] == [b.step(o) for o in sequence]


# thresholds

def measured(local: float, remote: float, queue_ms: float = 0.0,
             transfer: float = 0.0) -> tuple[WorkerLoad, ...]:
    return (decode(0, prefill_rate_tokens_per_s=local),
            prefill(0, prefill_rate_tokens_per_s=remote, queue_p50_ms=queue_ms,
                    transfer_bytes_per_s=transfer, mean_prefill_tokens=400))


def test_break_even_from_rates_queue_and_transfer() -> None:
    # local 1 ms/token; remote 20 ms + 30 ms queue + (0.5 + 0.1) ms/token: 50 / 0.4 = 125
    cfg = ThresholdConfig(max_step_fraction=10, hysteresis_fraction=0)
    result = retune(obs(0, *measured(1000, 2000, 30, 1e7), thresholds=replace(
        THRESHOLDS, prefill_length_threshold=100)), cfg, ttft_slo_ms=2000)
    assert result.thresholds.prefill_length_threshold == 125
    assert result.thresholds.moderate_length_threshold == round(125 * 0.375)
    # 1 instance x 2000 tok/s x 2 s / 400 tokens per job = 10 jobs; step bound 16 -> 10
    assert result.thresholds.prefill_queue_max == 10


def test_a_threshold_moves_by_bounded_steps_with_hysteresis() -> None:
    cfg = ThresholdConfig(max_step_fraction=0.5, hysteresis_fraction=0.1)
    # remote never faster: target max_prefill_length 4096, one step from 128 -> 192
    slow = retune(obs(0, *measured(1000, 1000, 500)), cfg, 2000)
    assert slow.thresholds.prefill_length_threshold == 192
    assert "break-even none" in slow.reasons[0]
    # a break-even within 10% of the value in force: unchanged
    near = retune(obs(0, *measured(1000, 2000, 40), thresholds=replace(
        THRESHOLDS, prefill_length_threshold=125)), cfg, 2000)
    assert near.thresholds.prefill_length_threshold == 125


def test_thresholds_need_measurements_of_both_pools() -> None:
    result = retune(obs(0, decode(0, prefill_rate_tokens_per_s=900)), ThresholdConfig(), 2000)
    assert result.thresholds == THRESHOLDS
    assert "measured on 1 decode and 0 prefill workers" in result.reasons[0]


def test_threshold_changes_wait_for_their_cooldown() -> None:
    p = PlannerPolicy(PolicyConfig(ScalingConfig(enabled=False),
                                   ThresholdConfig(cooldown_s=30)))
    first = p.step(obs(0, *measured(1000, 1000, 500)))
    assert first.thresholds.prefill_length_threshold == 192
    again = p.step(obs(10, *measured(1000, 1000, 500), thresholds=first.thresholds))
    assert again.thresholds.prefill_length_threshold == 192
    assert any("cooldown 30 s" in r for r in again.reasons)
    later = p.step(obs(31, *measured(1000, 1000, 500), thresholds=first.thresholds))
    assert later.thresholds.prefill_length_threshold == 288


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pd_ratio_max", -1.0, "scaling.pd_ratio_max: must be in"),
    ("min_decode", 0, "scaling.min_decode: must be in [1, 4096]"),
    ("gain", 0.0, "scaling.gain: must be in (0, 1]"),
])
def test_invalid_scaling_config_names_the_field(field: str, value: float, message: str) -> None:
    with pytest.raises(Exception, match=message.replace("[", r"\[").replace("(", r"\(")):
        ScalingConfig(**{field: value})  # type: ignore[arg-type]


def test_fixed_total_never_plans_a_negative_count() -> None:
    p = policy(fixed_total=1, min_prefill=1, scale_up_cooldown_s=0)
    plan = p.step(obs(0, decode(0, 0)))
    assert (plan.num_prefill, plan.num_decode) == (0, 1)  # min_decode wins over min_prefill


def test_fixed_total_shares_by_need_even_while_decode_misses_its_slo() -> None:
    # decode misses TPOT (wants 3, keeps 2 when pools grow); prefill has a deep backlog
    p = policy(fixed_total=3, scale_up_cooldown_s=0, tpot_slo_ms=150)
    workers = (decode(0, 40, itl_p99_ms=200, prefill_rate_tokens_per_s=300), decode(1, 40),
               prefill(0, prefill_rate_tokens_per_s=300, mean_prefill_tokens=600))
    # 15 queued jobs: 5 prefill instances wanted vs decode's 3: 3 x 5 / 8 -> 2 prefill
    plan = p.step(obs(0, *workers, queue=15))
    assert (plan.num_prefill, plan.num_decode) == (2, 1)
    # with pools that grow, decode keeps its 2 and gets one more
    grown = policy(max_step=4, tpot_slo_ms=150).step(obs(0, *workers, queue=15))
    assert grown.num_decode == 3 and grown.num_prefill >= 2
