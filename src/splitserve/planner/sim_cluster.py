"""The simulated cluster: instances (slots) of both roles, the router, the event queue,
and the planner's two hands (an `Observation` out, a `Plan` in).

What happens to a request at the cluster:
1. it arrives and the router picks a serving decode instance (the less loaded of two
   drawn at random: O(1) at hundreds of instances, close to least-loaded);
2. `routing.offload.should_offload_prefill` (the real rule, with the thresholds in
   force) sends it to the prefill pool or keeps it local; with no prefill instance
   serving it stays local (a worker only publishes when one is registered);
3. from there sim_decode.py and sim_prefill.py carry it to its last token.

What happens to an instance (a slot):
STARTING (asked for; serves after the profile's start-up time) → SERVING → DRAINING
(takes no new work, finishes what it has) → STOPPED, or with role flips (`fixed_total`)
→ FLIPPING (`role_flip_s`) → SERVING in the other role. Instance-seconds count from the
request to start until the stop, to the role held at each moment.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from splitserve.planner.model import Observation, Plan, Role, Thresholds, WorkerLoad
from splitserve.planner.profile import Profile
from splitserve.planner.sim_decode import DecodeInstance, Records, Seq, Window
from splitserve.planner.sim_prefill import Job, PrefillInstance, PrefillPool, PrefillWindow
from splitserve.routing.offload import RoutingConfig, should_offload_prefill


class SlotState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    FLIPPING = "flipping"
    STOPPED = "stopped"


class Event(enum.IntEnum):
    WAKE = 0  # a decode instance's next step boundary of interest
    PREFILL_DONE = 1
    KV_LANDED = 2
    READY = 3  # start-up over
    FLIPPED = 4
    TICK = 5


@dataclass
class Slot:
    sid: int
    role: Role
    state: SlotState
    since_s: float  # start of the current role segment
    decode: DecodeInstance | None = None
    prefill: PrefillInstance | None = None
    flip_to: Role | None = None
    window_from_s: float = 0.0
    tokens_at_tick: int = 0
    seconds: dict[Role, float] = field(default_factory=lambda: {Role.PREFILL: 0.0,
                                                               Role.DECODE: 0.0})

    def account(self, now: float) -> None:
        self.seconds[self.role] += max(0.0, now - self.since_s)
        self.since_s = now

    def load(self) -> int:
        if self.decode is not None:
            return self.decode.load
        return 0 if self.prefill is None or self.prefill.job is None else 1


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100.0 * len(ordered)) - 1)]


def _weighted_p99(steps: list[tuple[float, int]]) -> float:
    total = sum(n for _, n in steps)
    if not total:
        return 0.0
    rank, seen = 0.99 * total, 0
    for dt, n in sorted(steps):
        seen += n
        if seen >= rank:
            return dt
    return steps[-1][0]


class Cluster:
    def __init__(self, profile: Profile, routing: RoutingConfig, records: Records,
                 seed: int, flips: bool) -> None:
        self.profile = profile
        self.routing = routing
        self.records = records
        self.flips = flips
        self.rng = random.Random(seed)
        self.slots: list[Slot] = []
        self.pool = PrefillPool(profile)
        self.events: list[tuple[float, int, int, Any]] = []
        self._counter = 0
        self._serving_decode: list[DecodeInstance] = []
        self._slot_of: dict[int, Slot] = {}
        self._wake_at: dict[int, float] = {}
        self.num_events = 0

    # --- events ------------------------------------------------------------------------
    def push(self, t: float, kind: Event, obj: Any) -> None:
        self._counter += 1
        heapq.heappush(self.events, (t, self._counter, int(kind), obj))

    def touch(self, decode: DecodeInstance) -> None:
        """Queue the decode instance's wake-up if it moved."""
        if decode.wake_s != self._wake_at.get(decode.iid) and decode.wake_s < math.inf:
            self._wake_at[decode.iid] = decode.wake_s
            self.push(decode.wake_s, Event.WAKE, decode)

    def handle(self, t: float, kind: int, obj: Any) -> None:
        self.num_events += 1
        if kind == Event.WAKE:
            if obj.wake_s != t or self._wake_at.get(obj.iid) != t:
                return  # superseded
            obj.step_to(t)
            self.touch(obj)
            self._check_drained(self._slot_of[obj.iid], t)
        elif kind == Event.PREFILL_DONE:
            job, landed, started = self.pool.finish(obj, t)
            self.push(landed, Event.KV_LANDED, job)
            self._started(started)
            self._check_drained(self._slot_of[obj.iid], t)
        elif kind == Event.KV_LANDED:
            obj.decode.add(obj.seq, t)
            self.touch(obj.decode)
            self._check_drained(self._slot_of[obj.decode.iid], t)
        elif (kind == Event.READY and obj.state is SlotState.STARTING) or (
                kind == Event.FLIPPED and obj.state is SlotState.FLIPPING):
            self._serve(obj, t)

    def _started(self, started: list[tuple[float, PrefillInstance]]) -> None:
        for done_s, instance in started:
            self.push(done_s, Event.PREFILL_DONE, instance)

    # --- requests ----------------------------------------------------------------------
    def arrive(self, rid: int, t: float, prompt: int, output: int) -> None:
        serving = self._serving_decode
        if len(serving) == 1:
            decode = serving[0]
        else:
            a, b = self.rng.sample(serving, 2)
            decode = a if a.load <= b.load else b
        seq = Seq(rid, prompt, output, t, remote=False)
        self.records.num_tokens[rid] = output
        if self.pool.num_serving and should_offload_prefill(
                self.routing, prompt, self.pool.depth, decode.decode_load):
            seq.remote = True
            self.records.remote[rid] = True
            decode.num_pending_remote += 1
            self._started(self.pool.submit(Job(seq, decode, t), t))
        else:
            decode.add(seq, t)
            self.touch(decode)

    def set_thresholds(self, thresholds: Thresholds) -> None:
        self.routing = dataclasses.replace(self.routing, **dataclasses.asdict(thresholds))

    @property
    def thresholds(self) -> Thresholds:
        r = self.routing
        return Thresholds(r.prefill_length_threshold, r.moderate_length_threshold,
                          r.prefill_queue_max)

    # --- instances ----------------------------------------------------------------------
    def add_slot(self, role: Role, now: float, ready: bool) -> Slot:
        slot = Slot(len(self.slots), role, SlotState.STARTING, now)
        self.slots.append(slot)
        if ready:
            self._serve(slot, now)
        else:
            self.push(now + self.profile.startup_s(role is Role.PREFILL), Event.READY, slot)
        return slot

    def _serve(self, slot: Slot, now: float) -> None:
        slot.state, slot.flip_to, slot.window_from_s = SlotState.SERVING, None, now
        if slot.role is Role.DECODE:
            if slot.decode is None:
                slot.decode = DecodeInstance(slot.sid, self.profile, self.records)
                slot.tokens_at_tick = 0
                self._wake_at.pop(slot.sid, None)
            self._slot_of[slot.sid] = slot
            slot.prefill = None
            self._rebuild_serving()
        else:
            if slot.prefill is None:
                slot.prefill = PrefillInstance(slot.sid)
            self._slot_of[slot.sid] = slot
            slot.decode = None
            self._started(self.pool.add_instance(slot.prefill, now))

    def _rebuild_serving(self) -> None:
        self._serving_decode = [s.decode for s in self.slots if s.decode is not None
                                and s.role is Role.DECODE and s.state is SlotState.SERVING]

    def _drain(self, slot: Slot, now: float, flip_to: Role | None) -> None:
        slot.state, slot.flip_to = SlotState.DRAINING, flip_to
        if slot.prefill is not None:
            self.pool.drain(slot.prefill)
        self._rebuild_serving()
        self._check_drained(slot, now)

    def _check_drained(self, slot: Slot, now: float) -> None:
        if slot.state is not SlotState.DRAINING:
            return
        if (slot.decode is not None and not slot.decode.is_empty) or (
                slot.prefill is not None and not slot.prefill.is_empty):
            return
        slot.account(now)
        if slot.flip_to is None:
            slot.state = SlotState.STOPPED
            return
        slot.role, slot.state = slot.flip_to, SlotState.FLIPPING
        slot.decode = slot.prefill = None
        self.push(now + self.profile.role_flip_s, Event.FLIPPED, slot)

    def _stop_starting(self, slot: Slot, now: float) -> None:
        slot.account(now)
        slot.state = SlotState.STOPPED

    def counts(self) -> dict[Role, int]:
        """Instances held per role (starting, serving, draining, flipping into it)."""
        out = {Role.PREFILL: 0, Role.DECODE: 0}
        for slot in self.slots:
            if slot.state is not SlotState.STOPPED:
                out[slot.role] += 1
        return out

    def apply(self, plan: Plan, now: float) -> None:
        """Move each role toward the plan's count (decreases first: with flips they
        make the other role's increase)."""
        self.set_thresholds(plan.thresholds)
        for role in sorted(Role, key=lambda r: plan.count(r) - self._active(r)):
            want = plan.count(role)
            have = self._active(role)
            if want < have:
                self._shrink(role, have - want, now)
            elif want > have:
                self._grow(role, want - have, now)

    def _active(self, role: Role) -> int:
        return sum(1 for s in self.slots if (s.role is role and s.state in (
            SlotState.STARTING, SlotState.SERVING, SlotState.FLIPPING)) or (
            s.state is SlotState.DRAINING and s.flip_to is role))

    def _shrink(self, role: Role, num: int, now: float) -> None:
        starting = [s for s in self.slots if s.role is role and s.state is SlotState.STARTING]
        for slot in reversed(starting[len(starting) - min(num, len(starting)):]):
            self._stop_starting(slot, now)
            num -= 1
        serving = sorted((s for s in self.slots if s.role is role
                          and s.state is SlotState.SERVING), key=Slot.load)
        if role is Role.DECODE:
            serving = serving[:max(0, len(serving) - 1)]  # one keeps serving
        other = Role.PREFILL if role is Role.DECODE else Role.DECODE
        for slot in serving[:num]:
            self._drain(slot, now, other if self.flips else None)

    def _grow(self, role: Role, num: int, now: float) -> None:
        for slot in self.slots:  # a draining one is warm: it resumes
            if num and slot.role is role and slot.state is SlotState.DRAINING \
                    and slot.flip_to is None:
                self._serve(slot, now)
                num -= 1
        if not self.flips:
            for _ in range(num):
                self.add_slot(role, now, ready=False)

    # --- the planner's view ---------------------------------------------------------------
    def observe(self, now: float) -> tuple[Observation, list[float]]:
        """An observation of every reporting instance's window (then reset), and the
        TTFTs (ms) of the window, cluster-wide."""
        loads: list[WorkerLoad] = []
        ttfts: list[float] = []
        for slot in self.slots:
            if slot.state is SlotState.FLIPPING:
                loads.append(WorkerLoad(f"i{slot.sid}", slot.role, serving=False))
            elif slot.state in (SlotState.SERVING, SlotState.DRAINING):
                span = max(1e-9, now - slot.window_from_s)
                if slot.decode is not None:
                    loads.append(self._decode_load(slot, slot.decode, now, span))
                    ttfts.extend(slot.decode.window.ttft_ms)
                    slot.decode.window = Window()
                    slot.tokens_at_tick = slot.decode.tokens_by(now)
                elif slot.prefill is not None:
                    loads.append(self._prefill_load(slot, slot.prefill, span))
                    slot.prefill.window = PrefillWindow()
                slot.window_from_s = now
        obs = Observation(now, tuple(loads), len(self.pool.queue), self.thresholds,
                          self.profile.kv_bytes_per_token)
        return obs, ttfts

    def _decode_load(self, slot: Slot, d: DecodeInstance, now: float, span: float) -> WorkerLoad:
        w = d.window
        steps = list(w.step_ms)
        if d.decoding and d.epoch[2] > 0:
            steps.append((d.epoch[2] * 1e3, 1))  # the inter-token time right now
        return WorkerLoad(
            f"i{slot.sid}", Role.DECODE,
            decode_tokens_per_s=(d.tokens_by(now) - slot.tokens_at_tick) / span,
            prefill_tokens_per_s=w.prefill_tokens / span,
            prefill_rate_tokens_per_s=w.prefill_tokens / w.prefill_busy_s if w.prefill_busy_s
            else 0.0,
            queue_depth=len(d.waiting), num_running=d.num_running,
            kv_usage=d.kv_tokens() / self.profile.kv_capacity_tokens,
            ttft_p99_ms=percentile(w.ttft_ms, 99), itl_p99_ms=_weighted_p99(steps),
            tpot_p99_ms=percentile(w.tpot_ms, 99),
            queue_p50_ms=percentile(w.queue_ms, 50),
            mean_prefill_tokens=w.prefill_tokens / w.num_prefills if w.num_prefills else 0.0,
            serving=slot.state is SlotState.SERVING)

    def _prefill_load(self, slot: Slot, p: PrefillInstance, span: float) -> WorkerLoad:
        w = p.window
        return WorkerLoad(
            f"i{slot.sid}", Role.PREFILL, prefill_tokens_per_s=w.prefill_tokens / span,
            prefill_rate_tokens_per_s=w.prefill_tokens / w.busy_s if w.busy_s else 0.0,
            transfer_bytes_per_s=w.transfer_bytes / w.transfer_s if w.transfer_s else 0.0,
            queue_depth=len(self.pool.queue), num_running=0 if p.job is None else 1,
            queue_p50_ms=percentile(w.queue_ms, 50),
            mean_prefill_tokens=w.prefill_tokens / w.num_jobs if w.num_jobs else 0.0,
            serving=slot.state is SlotState.SERVING)

    def instance_seconds(self, now: float) -> dict[Role, float]:
        out = {Role.PREFILL: 0.0, Role.DECODE: 0.0}
        for slot in self.slots:
            for role, seconds in slot.seconds.items():
                out[role] += seconds
            if slot.state is not SlotState.STOPPED:
                out[slot.role] += max(0.0, now - slot.since_s)
        return out


Controller = Callable[[Observation], Plan]
