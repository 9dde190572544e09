"""What the planner daemon knows of the cluster: each worker's latest `WorkerStats`,
kept while it is recent and the worker registered, turned into one `Observation` per
tick.

A worker that stops publishing (dead, partitioned) drops out after `max_age_s`; one that
leaves the registry drops out at once; a worker whose stats name another role than its
descriptor (a role flip in progress) is counted under the role its latest stats name.
A registered worker without recent stats is `waiting` for `max_age_s` after the registry
first listed it (a new worker's first stats are on their way: the planner does not plan
from part of the cluster) and `unresponsive` after that (stuck, or gone without
deregistering: the planner reports it and plans without it).
Bounded: one entry per registered worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.planner.model import Observation, Role, Thresholds, WorkerLoad
from splitserve.rpc.jobs_pb2 import WorkerStats

ROLES = {role.value: role for role in Role}


@dataclass(frozen=True)
class Silent:
    """Registered workers without recent stats (sorted ids)."""

    waiting: tuple[str, ...] = ()  # registered less than max_age_s ago
    unresponsive: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    stats: WorkerStats
    received_s: float


def worker_load(stats: WorkerStats, serving: bool = True) -> WorkerLoad | None:
    """The planner's view of one stats message; None for an unknown role."""
    role = ROLES.get(stats.role)
    if role is None:
        return None
    return WorkerLoad(
        worker_id=stats.worker_id, role=role,
        decode_tokens_per_s=stats.tokens_per_s if role is Role.DECODE else 0.0,
        prefill_tokens_per_s=stats.prefill_tokens_per_s,
        prefill_rate_tokens_per_s=stats.prefill_rate_tokens_per_s,
        transfer_bytes_per_s=stats.transfer_bytes_per_s, queue_depth=stats.queue_depth,
        num_running=stats.num_running, kv_usage=stats.kv_usage,
        ttft_p99_ms=stats.ttft_p99_ms, itl_p99_ms=stats.itl_p99_ms,
        queue_p50_ms=stats.queue_p50_ms, mean_prefill_tokens=stats.mean_prefill_tokens,
        tpot_p99_ms=stats.tpot_p99_ms,
        serving=serving)


class StatsBook:
    """Latest stats per worker. `now_s` is any monotonic clock, the same for every call."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._entries: dict[str, _Entry] = {}
        self._registered: set[str] | None = None  # None: registry not read yet
        self._first_listed: dict[str, float] = {}  # registered id -> when first listed
        self._members_since = 0.0  # when the registry last listed another set of workers

    def add(self, stats: WorkerStats, now_s: float) -> None:
        if self._registered is not None and stats.worker_id not in self._registered:
            return
        self._entries[stats.worker_id] = _Entry(stats, now_s)

    def set_registered(self, worker_ids: set[str], now_s: float) -> None:
        """The registry's workers now: stats of any other are forgotten."""
        if self._registered is None or self._registered != worker_ids:
            self._members_since = now_s
        self._registered = set(worker_ids)
        for worker_id in list(self._entries):
            if worker_id not in self._registered:
                del self._entries[worker_id]
        self._first_listed = {w: self._first_listed.get(w, now_s) for w in self._registered}

    def settled_s(self, now_s: float) -> float:
        """How long the registry has listed the same workers (0 before it was read)."""
        return 0.0 if self._registered is None else now_s - self._members_since

    def silent(self, now_s: float) -> Silent:
        """Registered workers with no stats within `max_age_s` (call after `loads`)."""
        quiet = sorted((self._registered or set()) - set(self._entries))
        return Silent(
            tuple(w for w in quiet if now_s - self._first_listed[w] <= self.max_age_s),
            tuple(w for w in quiet if now_s - self._first_listed[w] > self.max_age_s))

    def role_of(self, worker_id: str) -> Role | None:
        """The role a worker's latest stats name (None: no stats kept)."""
        entry = self._entries.get(worker_id)
        return ROLES.get(entry.stats.role) if entry is not None else None

    def loads(self, now_s: float) -> tuple[WorkerLoad, ...]:
        for worker_id, entry in list(self._entries.items()):
            if now_s - entry.received_s > self.max_age_s:
                del self._entries[worker_id]
        loads = (worker_load(e.stats) for _, e in sorted(self._entries.items()))
        return tuple(load for load in loads if load is not None)

    def observation(self, now_s: float, prefill_queue_depth: int, thresholds: Thresholds,
                    kv_bytes_per_token: int = 0) -> Observation:
        return Observation(now_s, self.loads(now_s), prefill_queue_depth, thresholds,
                           kv_bytes_per_token)
