"""One simulation: a trace through the simulated cluster (sim_cluster.py), with the
planner's policy (planner/policy.py, the daemon's own code) or a static P:D.

The loop merges the trace's arrivals (in order, no heap) with the event heap; every
`interval_s` a tick builds an `Observation` of the instances' last windows, asks the
controller for a `Plan` and applies it (counts and thresholds). Ticks stop at the
horizon (the trace's last arrival, or `horizon_s`), where instance-seconds are taken;
the requests still in flight then run to their end with the pools as they are.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass

import numpy as np

from splitserve.config.planner import PlannerConfig
from splitserve.planner.model import Observation, Plan, Role, Thresholds
from splitserve.planner.policy import PlannerPolicy
from splitserve.planner.profile import Profile
from splitserve.planner.sim_cluster import Cluster, Controller, Event, percentile
from splitserve.planner.sim_decode import Records
from splitserve.planner.trace import Trace

log = logging.getLogger(__name__)

HORIZON = "horizon"


class StaticError(ValueError):
    """A `--static P:D` that is not two counts."""


def parse_pd(text: str) -> tuple[int, int]:
    """`P:D` → (prefill, decode): P >= 0 prefill instances, D >= 1 decode instances."""
    head, sep, tail = text.partition(":")
    try:
        if not sep:
            raise ValueError
        num_prefill, num_decode = int(head), int(tail)
    except ValueError:
        raise StaticError(f"expected P:D (prefill:decode instance counts, e.g. 4:8), "
                          f"got {text!r}") from None
    if num_prefill < 0 or num_decode < 1:
        raise StaticError(f"P:D needs P >= 0 and D >= 1, got {text!r}")
    return num_prefill, num_decode


@dataclass(frozen=True)
class SimSettings:
    """`static`: fixed (prefill, decode) pools and thresholds; else the planner scales from
    `initial` (default: min_prefill (at least 1), min_decode) and, with `fixed_total`,
    only flips roles."""

    planner: PlannerConfig
    profile: Profile
    static: tuple[int, int] | None = None
    initial: tuple[int, int] | None = None
    fixed_total: bool = False
    horizon_s: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class TimelinePoint:
    t_s: float
    num_prefill: int
    num_decode: int
    ttft_p99_ms: float  # of the first tokens in the window ending at t_s
    prefill_queue: int
    thresholds: Thresholds  # in force after the tick


@dataclass(frozen=True)
class SimResult:
    """Per request (arrays, index = request): arrival, first token and finish times,
    lengths, path and times finished; the pools over time; instance-seconds per role
    over [0, horizon]."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    first_s: np.ndarray
    finish_s: np.ndarray
    remote: np.ndarray
    num_finished: np.ndarray
    timeline: tuple[TimelinePoint, ...]
    instance_seconds: dict[Role, float]
    horizon_s: float
    interval_s: float
    mode: str
    wall_s: float
    num_events: int
    last_reasons: tuple[str, ...]


class StaticController:
    """The plan is always `num_prefill`:`num_decode` with the thresholds in force."""

    def __init__(self, num_prefill: int, num_decode: int) -> None:
        self.num_prefill, self.num_decode = num_prefill, num_decode

    def step(self, obs: Observation) -> Plan:
        return Plan(obs.now_s, self.num_prefill, self.num_decode, obs.thresholds,
                    ("static",))


def simulate(trace: Trace, settings: SimSettings) -> SimResult:
    started = time.perf_counter()
    planner, profile = settings.planner, settings.profile
    n = len(trace)
    records = Records.empty(n)
    cluster = Cluster(profile, planner.routing, records, settings.seed,
                      flips=settings.fixed_total)
    controller: Controller
    if settings.static is not None:
        num_prefill, num_decode = settings.static
        controller = StaticController(num_prefill, num_decode).step
        mode = f"static {num_prefill}:{num_decode}"
    else:
        scaling = planner.scaling
        num_prefill, num_decode = settings.initial or (max(1, scaling.min_prefill),
                                                       scaling.min_decode)
        policy = PlannerPolicy(planner.policy, fixed_total=(
            num_prefill + num_decode if settings.fixed_total else None))
        controller = policy.step
        mode = "planner" + (" (role flips)" if settings.fixed_total else "")
    for role, count in ((Role.PREFILL, num_prefill), (Role.DECODE, num_decode)):
        for _ in range(count):
            cluster.add_slot(role, 0.0, ready=True)
    horizon = settings.horizon_s if settings.horizon_s is not None else trace.span_s
    interval = planner.interval_s
    cluster.push(interval, Event.TICK, None)
    cluster.push(horizon, Event.TICK, HORIZON)
    timeline: list[TimelinePoint] = []
    seconds: dict[Role, float] = {}
    reasons: tuple[str, ...] = ()
    times, prompts, outputs = trace.t_s.tolist(), trace.prompt_tokens.tolist(), \
        trace.output_tokens.tolist()
    events, handle, arrive = cluster.events, cluster.handle, cluster.arrive
    i = 0
    while i < n or events:
        if i < n and (not events or times[i] <= events[0][0]):
            arrive(i, times[i], prompts[i], outputs[i])
            i += 1
            continue
        t, _, kind, obj = heapq.heappop(events)
        if kind != Event.TICK:
            handle(t, kind, obj)
            continue
        if t > horizon and obj is None:
            continue
        obs, ttfts = cluster.observe(t)
        plan = controller(obs)
        cluster.apply(plan, t)
        reasons = plan.reasons
        counts = cluster.counts()
        thresholds: Thresholds = cluster.thresholds
        timeline.append(TimelinePoint(t, counts[Role.PREFILL], counts[Role.DECODE],
                                      percentile(ttfts, 99), obs.prefill_queue_depth,
                                      thresholds))
        if obj == HORIZON:
            seconds = cluster.instance_seconds(t)
        elif t + interval <= horizon:
            cluster.push(t + interval, Event.TICK, None)
    wall = time.perf_counter() - started
    log.info("%s: %d requests, %d events in %.1f s", mode, n, cluster.num_events, wall)
    return SimResult(
        trace.t_s, trace.prompt_tokens, trace.output_tokens,
        np.asarray(records.first_s), np.asarray(records.finish_s),
        np.asarray(records.remote, dtype=bool), np.asarray(records.num_finished),
        tuple(timeline), seconds or cluster.instance_seconds(horizon), horizon, interval,
        mode, wall, cluster.num_events + n, reasons)

