"""What the planner sees and what it decides: the typed boundary between the policy
(planner/policy.py, pure), the daemon (which builds an `Observation` from `WorkerStats`,
the prefill queue's depth and the registry) and the trace simulator (which builds one
from its model of the cluster).

Units: times in seconds unless named `_ms`; token rates in tokens per second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Mode(enum.Enum):
    """auto: act on the plan; advise: compute, log and serve it, act on nothing;
    off: compute nothing."""

    AUTO = "auto"
    ADVISE = "advise"
    OFF = "off"


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's last stats window, as the planner reads it.

    - decode_tokens_per_s: output tokens/s generated (decode workers);
    - prefill_tokens_per_s: prompt tokens/s prefilled over the window (local prefills
      on a decode worker, jobs on a prefill worker);
    - prefill_rate_tokens_per_s: how fast it prefills while prefilling (measured
      throughput, not load; 0 when nothing was measured);
    - transfer_bytes_per_s: KV written per second of write time (prefill workers; 0
      when unmeasured);
    - queue_p50_ms: admission (decode) or job fetch (prefill) to start of prefill;
    - serving: health SERVING (a draining or flipping worker counts toward its role but
      takes no new work).
    """

    worker_id: str
    role: Role
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    prefill_rate_tokens_per_s: float = 0.0
    transfer_bytes_per_s: float = 0.0
    queue_depth: int = 0
    num_running: int = 0
    kv_usage: float = 0.0
    ttft_p99_ms: float = 0.0
    itl_p99_ms: float = 0.0
    queue_p50_ms: float = 0.0
    mean_prefill_tokens: float = 0.0  # uncached prompt tokens per prefill in the window
    tpot_p99_ms: float = 0.0  # of the requests finished in the window (0: none measured)
    serving: bool = True


@dataclass(frozen=True)
class Thresholds:
    """The routing thresholds the planner retunes (a subset of routing.RoutingConfig)."""

    prefill_length_threshold: int
    moderate_length_threshold: int
    prefill_queue_max: int


@dataclass(frozen=True)
class Observation:
    """Everything one planner tick decides from, taken at `now_s` (any monotonic clock).

    `workers`: the registered workers with a recent stats window; `prefill_queue_depth`:
    jobs waiting in the prefill work queue; `thresholds`: those in force; `kv_bytes_per_token`:
    KV cache bytes per token (transfer time = tokens × this / transfer rate)."""

    now_s: float
    workers: tuple[WorkerLoad, ...]
    prefill_queue_depth: int
    thresholds: Thresholds
    kv_bytes_per_token: int = 0

    def of(self, role: Role) -> tuple[WorkerLoad, ...]:
        return tuple(w for w in self.workers if w.role is role)


@dataclass(frozen=True)
class Plan:
    """What the pools and thresholds should be, and why (one line per reason).

    `num_prefill`/`num_decode`: target instances per role; `thresholds`: the routing
    thresholds to be in force (equal to the observation's when unchanged)."""

    now_s: float
    num_prefill: int
    num_decode: int
    thresholds: Thresholds
    reasons: tuple[str, ...] = field(default=())

    def count(self, role: Role) -> int:
        return self.num_prefill if role is Role.PREFILL else self.num_decode
