"""How many prefill and decode instances the load needs now (after HeteroScale).

Decode: the signal is output tokens/s per decode instance, which rises with load
(bigger batches) until the instance saturates; `target_decode_tokens_per_s` is the rate
at which one instance still meets the TPOT SLO. Proportional control: the count that
would bring the mean rate to the target is `n × rate / target`; a change closes `gain`
of the gap, eagerly upward (ceil) and cautiously downward (round), and nothing moves
while the rate is within `tolerance` of the target (hysteresis). SLO violations are
negative feedback: a TPOT p99 (per finished request; inter-token p99 when none finished)
over the TPOT SLO, or a TTFT p99 over its SLO while the prefill pool has no backlog (then
the decode workers' own queues are the cause), on at least `violation_fraction` of the
decode workers, adds a decode instance and forbids scaling decode down.

Prefill: follows from measured prefill load, not from its own latency: the prompt
tokens/s the pool prefilled plus the queued backlog (cleared within
`backlog_drain_s`), over one instance's measured rate × `prefill_target_utilization`.
The P/D ratio is then kept within [pd_ratio_min, pd_ratio_max].

Floors: never fewer decode instances than the KV pages in use need (Σ kv_usage,
rounded up), never zero prefill instances while jobs are queued or running.

Pure functions of an `Observation`; planner/policy.py adds cooldowns and steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.config.planner import ScalingConfig
from splitserve.planner.model import Observation, Role, WorkerLoad


@dataclass(frozen=True)
class Want:
    """What one role should have, the least it may have now (what in-flight work
    needs), and why; `keep`: the least it should keep while its SLOs are violated (with
    pools that grow, not below it; with a fixed total the other role's need may win)."""

    count: int
    floor: int
    reason: str
    keep: int = 0


def decode_want(obs: Observation, cfg: ScalingConfig) -> Want:
    workers = obs.of(Role.DECODE)
    n = len(workers)
    floor = max(cfg.min_decode, math.ceil(sum(w.kv_usage for w in workers) - 1e-9))
    if n == 0:
        return Want(cfg.min_decode, floor, "no decode worker reports stats")
    rate = sum(w.decode_tokens_per_s for w in workers) / n
    load = rate / cfg.target_decode_tokens_per_s
    proportional = n + cfg.gain * (n * load - n)
    violation = _violation(obs, workers, cfg)
    if violation:
        count = max(n + 1, math.ceil(proportional))
        return Want(count, floor, f"decode {violation}: +1 at least", keep=n)
    if abs(load - 1.0) < cfg.tolerance:
        return Want(n, floor, f"decode {rate:.1f} tok/s per instance, within "
                              f"{cfg.tolerance:.0%} of the target {cfg.target_decode_tokens_per_s:g}")
    count = math.ceil(proportional) if load > 1 else round(proportional)
    return Want(max(count, 0), floor,
                f"decode {rate:.1f} tok/s per instance vs target "
                f"{cfg.target_decode_tokens_per_s:g} ({load:.2f}x) over {n}")


def _tpot_ms(w: WorkerLoad) -> float:
    """TPOT p99 of the requests it finished; inter-token p99 when none finished."""
    return w.tpot_p99_ms or w.itl_p99_ms


def _over(workers: tuple[WorkerLoad, ...], value: Callable[[WorkerLoad], float], limit: float,
          cfg: ScalingConfig) -> list[WorkerLoad]:
    """The workers over `limit`, when they are at least `violation_fraction` of them (one
    at least), worst first; else none (across many workers one window's p99 is noise)."""
    over = sorted((w for w in workers if value(w) > limit), key=value, reverse=True)
    need = max(1, math.ceil(cfg.violation_fraction * len(workers) - 1e-9))
    return over if len(over) >= need else []


def _violation(obs: Observation, workers: tuple[WorkerLoad, ...], cfg: ScalingConfig) -> str:
    """Why decode needs help now ("" : it does not)."""
    over = _over(workers, _tpot_ms, cfg.tpot_slo_ms, cfg)
    if over:
        return (f"TPOT SLO violated on {len(over)} of {len(workers)}: {over[0].worker_id} "
                f"TPOT p99 {_tpot_ms(over[0]):.0f} ms > {cfg.tpot_slo_ms:g} ms")
    over = _over(workers, lambda w: w.ttft_p99_ms, cfg.ttft_slo_ms, cfg)
    if over and not _prefill_backlog(obs):
        return (f"TTFT SLO violated with no prefill backlog on {len(over)} of {len(workers)}: "
                f"{over[0].worker_id} TTFT p99 {over[0].ttft_p99_ms:.0f} ms > "
                f"{cfg.ttft_slo_ms:g} ms")
    return ""


def _prefill_backlog(obs: Observation) -> bool:
    return obs.prefill_queue_depth > 0


def prefill_want(obs: Observation, cfg: ScalingConfig, num_decode: int) -> Want:
    workers = obs.of(Role.PREFILL)
    n = len(workers)
    busy = obs.prefill_queue_depth > 0 or any(w.num_running > 0 for w in workers)
    floor = max(cfg.min_prefill, 1 if busy and n > 0 else 0)
    rate = _median([w.prefill_rate_tokens_per_s for w in workers]) or _median(
        [w.prefill_rate_tokens_per_s for w in obs.of(Role.DECODE)])
    if rate is None:
        return _in_band(max(n, floor), floor, num_decode, cfg,
                        "no prefill rate measured yet: unchanged")
    demand = sum(w.prefill_tokens_per_s for w in workers)
    # a job's size as measured, or at least the length that sends a prompt remote
    job_tokens = _median([w.mean_prefill_tokens for w in workers]) or float(
        obs.thresholds.prefill_length_threshold)
    backlog = obs.prefill_queue_depth * job_tokens / cfg.backlog_drain_s
    need = (demand + backlog) / (rate * cfg.prefill_target_utilization)
    why = (f"prefill load {demand:.0f} tok/s + backlog {obs.prefill_queue_depth} jobs "
           f"({backlog:.0f} tok/s to clear) at {rate:.0f} tok/s per instance x "
           f"{cfg.prefill_target_utilization:g}: {need:.2f} instances")
    if need > n:
        count = math.ceil(need)
    elif math.ceil(need * (1 + cfg.tolerance)) < n:
        count = math.ceil(need * (1 + cfg.tolerance))
    else:
        count = n
    if _prefill_backlog(obs) and _over(obs.of(Role.DECODE), lambda w: w.ttft_p99_ms,
                                       cfg.ttft_slo_ms, cfg):
        count = max(count, n + 1)
        why += "; TTFT SLO violated with a prefill backlog: +1 at least"
    return _in_band(count, floor, num_decode, cfg, why)


def _in_band(count: int, floor: int, num_decode: int, cfg: ScalingConfig, why: str) -> Want:
    """`count` with the P/D ratio kept in the configured band."""
    low = math.ceil(cfg.pd_ratio_min * num_decode - 1e-9)
    high = math.floor(cfg.pd_ratio_max * num_decode + 1e-9)
    if count < low:
        return Want(low, floor, f"{why}; raised to {low} by pd_ratio_min {cfg.pd_ratio_min:g}")
    if count > high:
        return Want(high, floor, f"{why}; capped at {high} by pd_ratio_max {cfg.pd_ratio_max:g}")
    return Want(count, floor, why)


def _median(values: list[float]) -> float | None:
    measured = [v for v in values if v > 0]
    return statistics.median(measured) if measured else None
