"""The planner daemon's tick: observe, lead or stand by, plan, act, remember.

A tick (every `interval_s`):
1. read the registry: which workers exist, their Admin addresses and KV bytes per
   token; stats of workers no longer registered are forgotten (planner/observe.py);
   while a newly listed worker has sent no stats yet there is no plan, nor until the
   same workers have been listed for `settle_s` (start-up, a worker joined or left);
   one silent past `stats_max_age_s` is reported unresponsive and planned without;
2. mode `off`: stop here (the last policy written stays in force);
3. take or renew the lock (planner/leader.py); a standby stops here;
4. read the prefill queue's depth and the `routing` key of splitserve-policy (the
   thresholds in force: the workers' file routing with that key over it);
5. plan (planner/policy.py, the same code the simulator runs);
6. mode `auto`: write changed thresholds to `routing` (compare-and-set on the revision
   read, the override's other fields kept) with an audit record (old, new, why) in
   `planner.audit`; hand the targets to the actuator. Mode `advise`: only describe.
A broker error fails the tick (logged, counted); the next tick starts afresh. Nothing
the planner does is needed for serving: if it dies, the workers keep the last policy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.js.errors import NotFoundError

from splitserve.config.planner import PlannerConfig
from splitserve.planner.actuators import Actuator, WorkerRef, describe
from splitserve.planner.leader import PlannerLock
from splitserve.planner.model import Mode, Observation, Plan, Role, Thresholds
from splitserve.planner.observe import StatsBook
from splitserve.planner.policy import PlannerPolicy
from splitserve.queue.depth import prefill_queue_depth
from splitserve.queue.errors import PolicyConflict
from splitserve.queue.policy import PolicyStore
from splitserve.queue.registry import WorkerRegistry, parse_descriptor
from splitserve.queue.settings import PrefillQueueSettings
from splitserve.routing.policy import (
    ROUTING_POLICY_KEY,
    effective_routing,
    encode_override,
    parse_override,
)

log = logging.getLogger(__name__)

AUDIT_KEY = "planner.audit"
MAX_AUDIT_RECORDS = 64  # kept in the bucket (the daemon keeps `history_size` in memory)


@dataclass(frozen=True)
class AuditRecord:
    timestamp_unix_s: float
    key: str
    old_value: str  # JSON; "" : unset
    new_value: str
    why: str
    revision: int


@dataclass(frozen=True)
class PlanRecord:
    """One tick as GetPlan and History show it."""

    timestamp_unix_s: float
    mode: Mode
    leader: bool
    current: dict[Role, int] = field(default_factory=dict)
    plan: Plan | None = None
    thresholds_in_force: Thresholds | None = None
    actions: tuple[str, ...] = ()
    note: str = ""  # why there is no plan (off, standby, broker error)
    policy_revision: int = 0


class PlannerRunner:
    def __init__(self, config: PlannerConfig, planner_id: str, store: PolicyStore,
                 registry: WorkerRegistry, js: object, actuator: Actuator,
                 book: StatsBook, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.planner_id = planner_id
        self.store, self.registry, self.js = store, registry, js
        self.actuator, self.book = actuator, book
        self.clock, self.wall = clock, wall
        self.mode = Mode(config.mode)
        self.lock = PlannerLock(store, planner_id, config.lock_ttl_s)
        self.policy = PlannerPolicy(config.policy)
        self.queue_settings = PrefillQueueSettings(replicas=config.nats.replicas)
        self.last = PlanRecord(0.0, self.mode, False, note="no tick yet")
        self.history: deque[PlanRecord] = deque(maxlen=config.history_size)
        self.audit: deque[AuditRecord] = deque(maxlen=config.history_size)
        self.num_ticks = 0
        self.num_tick_failures = 0
        self.num_policy_writes = 0
        self.unresponsive: tuple[str, ...] = ()  # registered, silent past stats_max_age_s

    def set_mode(self, mode: Mode) -> Mode:
        previous, self.mode = self.mode, mode
        if previous is not mode:
            log.info("planner %s: mode %s -> %s", self.planner_id, previous.value, mode.value)
        return previous

    async def tick(self) -> PlanRecord:
        self.num_ticks += 1
        try:
            record = await self._tick()
        except Exception as exc:  # noqa: BLE001 (a broker outage must not end the planner)
            self.num_tick_failures += 1
            log.warning("planner %s: tick failed: %s: %s", self.planner_id,
                        type(exc).__name__, exc)
            record = PlanRecord(self.wall(), self.mode, self.lock.leading,
                                note=f"tick failed: {type(exc).__name__}: {exc}")
        self.last = record
        return record

    async def _tick(self) -> PlanRecord:
        refs, kv_bytes_per_token = await self._registered()
        now, wall = self.clock(), self.wall()
        if self.mode is Mode.OFF:
            return PlanRecord(wall, self.mode, self.lock.leading, note="mode off")
        if not await self.lock.tick(wall):
            return PlanRecord(wall, self.mode, False,
                              note=f"standby: {self.lock.holder} leads")
        depth = await self._queue_depth()
        entry = await self.store.get(ROUTING_POLICY_KEY)
        routing = effective_routing(self.config.routing, entry.value if entry else None)
        in_force = Thresholds(routing.prefill_length_threshold,
                              routing.moderate_length_threshold, routing.prefill_queue_max)
        obs = self.book.observation(now, depth, in_force, kv_bytes_per_token)
        silent, settled_s = self.book.silent(now), self.book.settled_s(now)
        # a plan from part of the cluster, or one still forming, moves the wrong workers
        waiting = (f"waiting for stats of {', '.join(silent.waiting)}" if silent.waiting
                   else f"waiting: the registered workers changed {settled_s:.0f} s ago "
                        f"(settle_s {self.config.settle_s:g})"
                   if settled_s < self.config.settle_s else "")
        if waiting:
            return PlanRecord(wall, self.mode, True, _current(obs), None, in_force,
                              note=waiting, policy_revision=entry.revision if entry else 0)
        self._report_unresponsive(silent.unresponsive)
        if self.config.actuator.kind == "role":
            self.policy.fixed_total = len(obs.workers)
        plan = self.policy.step(obs)
        loads = {w.worker_id: w for w in obs.workers}
        workers = [WorkerRef(loads[worker_id], address) for worker_id, address in refs.items()
                   if worker_id in loads]
        revision = entry.revision if entry else 0
        if self.mode is Mode.AUTO:
            if plan.thresholds != in_force:
                revision = await self._write_thresholds(plan, entry.value if entry else None,
                                                        revision)
            actions = self.actuator.apply(plan, workers)
        else:
            actions = tuple(f"advise: {a}" for a in _advice(plan, workers, in_force))
        record = PlanRecord(wall, self.mode, True, _current(obs), plan, in_force, actions,
                            note=_unresponsive_note(silent.unresponsive),
                            policy_revision=revision)
        if record.actions or plan.thresholds != in_force or _changed(self.history, record):
            self.history.append(record)
            log.info("planner %s: plan %d prefill / %d decode (now %d / %d); %s; %s",
                     self.planner_id, plan.num_prefill, plan.num_decode,
                     record.current[Role.PREFILL], record.current[Role.DECODE],
                     "; ".join(actions) or "no action", "; ".join(plan.reasons))
        return record

    def _report_unresponsive(self, worker_ids: tuple[str, ...]) -> None:
        if worker_ids != self.unresponsive:
            if worker_ids:
                log.warning("planner %s: %s", self.planner_id, _unresponsive_note(worker_ids))
            self.unresponsive = worker_ids

    async def _queue_depth(self) -> int:
        try:
            return await prefill_queue_depth(self.js, self.queue_settings)  # type: ignore[arg-type]
        except NotFoundError:  # no worker has created the prefill stream yet
            return 0

    async def _registered(self) -> tuple[dict[str, str], int]:
        """Admin address per registered worker, and the KV bytes per token (0: unknown)."""
        addresses, kv_bytes = {}, 0
        for worker_id, data in (await self.registry.list()).items():
            descriptor = parse_descriptor(worker_id, data)
            if descriptor is None:
                continue
            addresses[worker_id] = descriptor.grpc_address
            geometry = descriptor.geometry
            if geometry.page_size:
                kv_bytes = geometry.bytes_per_page // geometry.page_size
        self.book.set_registered(set(addresses), self.clock())
        return addresses, kv_bytes

    async def _write_thresholds(self, plan: Plan, old: bytes | None, revision: int) -> int:
        fields = parse_override(old) if old else {}
        new_fields = {**fields, **dataclasses.asdict(plan.thresholds)}
        try:
            new_revision = await self.store.put(ROUTING_POLICY_KEY, encode_override(new_fields),
                                                expected_revision=revision)
        except PolicyConflict as exc:  # an operator wrote meanwhile: theirs stands
            log.warning("planner %s: routing changed while planning (%s); next tick",
                        self.planner_id, exc)
            return revision
        self.num_policy_writes += 1
        why = "; ".join(r for r in plan.reasons if "threshold" in r)
        record = AuditRecord(self.wall(), ROUTING_POLICY_KEY,
                             json.dumps(fields, sort_keys=True) if old else "",
                             json.dumps(new_fields, sort_keys=True), why, new_revision)
        self.audit.append(record)
        await self._write_audit()
        log.info("planner %s: routing revision %d: %s", self.planner_id, new_revision, why)
        return new_revision

    async def _write_audit(self) -> None:
        records = [dataclasses.asdict(r) for r in list(self.audit)[-MAX_AUDIT_RECORDS:]]
        await self.store.put(AUDIT_KEY, json.dumps(records, sort_keys=True).encode())


def _unresponsive_note(worker_ids: tuple[str, ...]) -> str:
    if not worker_ids:
        return ""
    return (f"unresponsive (registered, no stats within stats_max_age_s): "
            f"{', '.join(worker_ids)}; planning without them")


def _current(obs: Observation) -> dict[Role, int]:
    return {role: len(obs.of(role)) for role in Role}


def _advice(plan: Plan, workers: list[WorkerRef], in_force: Thresholds) -> list[str]:
    advice = list(describe(plan, workers))
    if plan.thresholds != in_force:
        advice.append(f"set thresholds {dataclasses.asdict(plan.thresholds)}")
    return advice


def _changed(history: deque[PlanRecord], record: PlanRecord) -> bool:
    if not history:
        return True
    last = history[-1]
    return (last.plan is None or record.plan is None or last.current != record.current
            or (last.plan.num_prefill, last.plan.num_decode, last.plan.thresholds)
            != (record.plan.num_prefill, record.plan.num_decode, record.plan.thresholds))
