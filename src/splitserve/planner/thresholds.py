"""Routing thresholds from live measurements.

- `prefill_length_threshold`: the break-even effective prompt length from which a
  remote prefill gives the first token sooner than a local one. Local: the decode
  workers' measured prefill rate (while they decode, so it includes the competition).
  Remote: fixed overhead (publish + KVReady) + the prefill pool's queue wait, then per
  token the pool's prefill rate plus the KV transfer (bytes per token / measured
  transfer rate). The two lines cross where `planner.calibration.crossing` says; no
  crossing (remote never faster) means `max_prefill_length`, so the longest prompts
  still go to the pool, which is what keeps them from stalling other users' tokens.
- `moderate_length_threshold`: a fixed fraction of it.
- `prefill_queue_max`: the jobs the pool clears within the TTFT SLO (instances × rate
  × SLO / tokens per job); beyond it a queued prompt waits longer than prefilling
  locally would cost the SLO.
A proposal moves at most `max_step_fraction` of the value in force; smaller changes
than `hysteresis_fraction` are not proposed (the plan would flap on noise).

Pure functions; planner/policy.py applies the cooldown.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from splitserve.config.planner import ThresholdConfig
from splitserve.planner.calibration import Line, crossing
from splitserve.planner.model import Observation, Role, Thresholds

MAX_QUEUE = 1 << 16  # RoutingConfig's bound on prefill_queue_max


@dataclass(frozen=True)
class Retune:
    """Proposed thresholds (equal to those in force when nothing should move) and why."""

    thresholds: Thresholds
    reasons: tuple[str, ...]


def retune(obs: Observation, cfg: ThresholdConfig, ttft_slo_ms: float) -> Retune:
    now = obs.thresholds
    local = _rates(obs, Role.DECODE)
    remote = _rates(obs, Role.PREFILL)
    if len(local) < cfg.min_samples_workers or len(remote) < cfg.min_samples_workers:
        why = (f"thresholds unchanged: prefill rates measured on {len(local)} decode and "
               f"{len(remote)} prefill workers, {cfg.min_samples_workers} of each needed")
        return Retune(now, (why,))
    local_rate, remote_rate = statistics.median(local), statistics.median(remote)
    prefill = obs.of(Role.PREFILL)
    queue_ms = statistics.median([w.queue_p50_ms for w in prefill])
    transfer = [w.transfer_bytes_per_s for w in prefill if w.transfer_bytes_per_s > 0]
    transfer_ms = (1e3 * obs.kv_bytes_per_token / statistics.median(transfer)
                   if transfer and obs.kv_bytes_per_token else 0.0)
    local_line = Line(0.0, 1e3 / local_rate, ())
    remote_line = Line(cfg.overhead_ms + queue_ms, 1e3 / remote_rate + transfer_ms, ())
    even = crossing(local_line, remote_line)
    target = cfg.max_prefill_length if even is None else min(
        cfg.max_prefill_length, max(cfg.min_prefill_length, even))
    basis = (f"local {local_rate:.0f} tok/s vs remote {cfg.overhead_ms + queue_ms:.0f} ms + "
             f"{remote_line.slope_ms_per_token:.2f} ms/token ({remote_rate:.0f} tok/s, "
             f"transfer {transfer_ms:.3f} ms/token): break-even "
             f"{'none' if even is None else even}")
    length = _step(now.prefill_length_threshold, target, cfg)
    reasons = []
    if length != now.prefill_length_threshold:
        reasons.append(f"prefill_length_threshold {now.prefill_length_threshold} -> {length}: "
                       f"{basis}")
    moderate = now.moderate_length_threshold
    if length != now.prefill_length_threshold:
        moderate = round(length * cfg.moderate_fraction)
        reasons.append(f"moderate_length_threshold {now.moderate_length_threshold} -> "
                       f"{moderate}: {cfg.moderate_fraction:g} of the length threshold")
    queue_max = _queue_max(obs, cfg, ttft_slo_ms, remote_rate, length)
    if queue_max != now.prefill_queue_max:
        reasons.append(f"prefill_queue_max {now.prefill_queue_max} -> {queue_max}: jobs "
                       f"{len(prefill)} prefill instances at {remote_rate:.0f} tok/s clear "
                       f"within the TTFT SLO {ttft_slo_ms:g} ms")
    if not reasons:
        reasons.append(f"thresholds unchanged: {basis}")
    return Retune(Thresholds(length, moderate, queue_max), tuple(reasons))


def _rates(obs: Observation, role: Role) -> list[float]:
    return [w.prefill_rate_tokens_per_s for w in obs.of(role)
            if w.prefill_rate_tokens_per_s > 0]


def _step(current: int, target: int, cfg: ThresholdConfig) -> int:
    """`target`, moved toward from `current` by at most max_step_fraction of it; `current`
    when the move is under hysteresis_fraction of it."""
    base = max(current, cfg.min_prefill_length, 1)
    if abs(target - current) < cfg.hysteresis_fraction * base:
        return current
    bound = cfg.max_step_fraction * base
    moved = min(current + bound, max(current - bound, target))
    return int(min(cfg.max_prefill_length, max(cfg.min_prefill_length, round(moved))))


def _queue_max(obs: Observation, cfg: ThresholdConfig, ttft_slo_ms: float,
               rate: float, length: int) -> int:
    now = obs.thresholds.prefill_queue_max
    prefill = obs.of(Role.PREFILL)
    sizes = [w.mean_prefill_tokens for w in prefill if w.mean_prefill_tokens > 0]
    job_tokens = statistics.median(sizes) if sizes else float(max(length, 1))
    fits = math.floor(len(prefill) * rate * ttft_slo_ms / 1e3 / job_tokens)
    target = min(MAX_QUEUE, max(1, fits))
    if abs(target - now) < max(1.0, cfg.hysteresis_fraction * now):
        return now
    bound = max(1.0, cfg.max_step_fraction * now)
    return int(min(now + bound, max(now - bound, target)))
