"""The planner's policy: one `Plan` per tick from one `Observation`. Pure and
clock-driven (time only from `obs.now_s`), so the daemon and the trace simulator run
the same code.

A tick:
1. want: decode and prefill counts from the load (planner/scaling.py), each with the
   floor that in-flight work needs;
2. with a fixed total (the `role` actuator flips workers, it adds none), the two wants
   share the workers present: prefill gets its want within [min_prefill,
   total - min_decode], or a proportional share when both want more than there is;
3. targets move at most `max_step` per role per change, within [min, max] and never
   below the floors; a change waits out the role's cooldown since its last change
   (`scale_up_cooldown_s` up, `scale_down_cooldown_s` down) — the target stays as it was
   meanwhile, so an instance still starting is not asked for twice;
4. thresholds: proposed by planner/thresholds.py, applied at most once per
   `cooldown_s`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.config.planner import PolicyConfig, ScalingConfig
from splitserve.planner.model import Observation, Plan, Role, Thresholds
from splitserve.planner.scaling import Want, decode_want, prefill_want
from splitserve.planner.thresholds import retune

NEVER = -math.inf


@dataclass
class _Target:
    count: int
    changed_s: float = NEVER


class PlannerPolicy:
    """Targets per role and thresholds, with the memory hysteresis needs (last targets,
    when they changed). `fixed_total`: the sum of the targets is this (role flips)."""

    def __init__(self, config: PolicyConfig, *, fixed_total: int | None = None) -> None:
        self.config = config
        self.fixed_total = fixed_total
        self._targets: dict[Role, _Target] = {}
        self._thresholds: Thresholds | None = None
        self._thresholds_changed_s = NEVER

    def step(self, obs: Observation) -> Plan:
        reasons: list[str] = []
        counts = self._scale(obs, reasons)
        thresholds = self._retune(obs, reasons)
        return Plan(obs.now_s, counts[Role.PREFILL], counts[Role.DECODE], thresholds,
                    tuple(reasons))

    def _scale(self, obs: Observation, reasons: list[str]) -> dict[Role, int]:
        cfg = self.config.scaling
        self._rebase(obs)
        if not cfg.enabled:
            reasons.append("scaling disabled")
            return self._counts()
        decode = decode_want(obs, cfg)
        prefill = prefill_want(obs, cfg, max(decode.count, decode.floor, decode.keep))
        wants = {Role.DECODE: decode, Role.PREFILL: prefill}
        if self.fixed_total is not None:
            wants = self._share(wants, self.fixed_total, cfg)
        for role in (Role.DECODE, Role.PREFILL):
            reasons.append(f"{role.value}: {wants[role].reason}")
        proposed = {role: self._bounded(role, want, cfg) for role, want in wants.items()}
        if self.fixed_total is not None:  # flips: a worker leaves one role for the other
            proposed[Role.PREFILL] = max(0, min(proposed[Role.PREFILL],
                                                self.fixed_total - cfg.min_decode))
            proposed[Role.DECODE] = self.fixed_total - proposed[Role.PREFILL]
        waits = [why for role, count in proposed.items()
                 if (why := self._cooldown(role, count, obs.now_s, cfg))]
        if self.fixed_total is not None and waits:
            reasons.extend(waits)  # both roles move together or neither does
            return self._counts()
        for role, count in proposed.items():
            target = self._targets[role]
            if count == target.count:
                continue
            why = self._cooldown(role, count, obs.now_s, cfg)
            if why:
                reasons.append(why)
                continue
            reasons.append(f"{role.value} {target.count} -> {count}")
            target.count, target.changed_s = count, obs.now_s
        return self._counts()

    def _counts(self) -> dict[Role, int]:
        return {role: t.count for role, t in self._targets.items()}

    def _rebase(self, obs: Observation) -> None:
        """Targets start at the counts observed; with a fixed total, again whenever the
        targets no longer add up to it (a worker joined or left)."""
        for role in Role:
            self._targets.setdefault(role, _Target(len(obs.of(role))))
        if self.fixed_total is not None and sum(
                t.count for t in self._targets.values()) != self.fixed_total:
            for role in Role:
                self._targets[role].count = len(obs.of(role))

    def _share(self, wants: dict[Role, Want], total: int,
               cfg: ScalingConfig) -> dict[Role, Want]:
        """Both wants within `total` workers: decode keeps at least min_decode."""
        d, p = wants[Role.DECODE], wants[Role.PREFILL]
        prefill = p.count
        if d.count + p.count > total and d.count + p.count > 0:
            prefill = round(total * p.count / (d.count + p.count))
        high = max(0, total - max(cfg.min_decode, d.floor))
        prefill = min(high, max(p.floor, prefill))
        why = f"{total} workers shared: {prefill} prefill, {total - prefill} decode"
        return {Role.PREFILL: Want(prefill, min(p.floor, high), f"{p.reason}; {why}"),
                Role.DECODE: Want(total - prefill, d.floor, d.reason)}

    def _bounded(self, role: Role, want: Want, cfg: ScalingConfig) -> int:
        current = self._targets[role].count
        low, high = ((cfg.min_decode, cfg.max_decode) if role is Role.DECODE
                     else (cfg.min_prefill, cfg.max_prefill))
        count = min(current + cfg.max_step, max(current - cfg.max_step, want.count))
        floor = want.floor if self.fixed_total is not None else max(want.floor, want.keep)
        return max(floor, min(high, max(low, count)))

    def _cooldown(self, role: Role, count: int, now_s: float, cfg: ScalingConfig) -> str:
        """Why `role` may not move to `count` yet ("" : it may)."""
        target = self._targets[role]
        if count == target.count:
            return ""
        cooldown = cfg.scale_up_cooldown_s if count > target.count else cfg.scale_down_cooldown_s
        if now_s - target.changed_s >= cooldown:
            return ""
        return (f"{role.value} {target.count} -> {count} waits: cooldown {cooldown:g} s "
                f"since its last change {now_s - target.changed_s:.0f} s ago")

    def _retune(self, obs: Observation, reasons: list[str]) -> Thresholds:
        cfg = self.config.thresholds
        current = self._thresholds or obs.thresholds
        if not cfg.enabled:
            return current
        proposal = retune(obs, cfg, self.config.scaling.ttft_slo_ms)
        if proposal.thresholds == obs.thresholds:
            self._thresholds = obs.thresholds
            reasons.extend(proposal.reasons)
            return obs.thresholds
        if obs.now_s - self._thresholds_changed_s < cfg.cooldown_s:
            reasons.append(f"thresholds wait: cooldown {cfg.cooldown_s:g} s since the last "
                           "change")
            return current
        reasons.extend(proposal.reasons)
        self._thresholds, self._thresholds_changed_s = proposal.thresholds, obs.now_s
        return proposal.thresholds
