"""What the Admin service needs from a daemon: plain data and a small protocol.

Daemons implement `AdminBackend` (see `LocalAdminBackend` for a worker whose
engine runs in-process); `AdminServicer` turns it into the `splitserve.v1.Admin`
service. Nothing here knows about protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from splitserve.config.reload import ReloadResult
from splitserve.control.tracker import RequestTracker
from splitserve.engine.stats import EngineStats

SERVING = "SERVING"
DRAINING = "DRAINING"


@dataclass(frozen=True)
class StatusCounters:
    """Cumulative since the daemon started. Names are those of
    `GetStatusResponse.Counters` (admin.proto), which documents each."""

    num_local_prefills: int = 0
    num_remote_prefills: int = 0
    num_transfers: int = 0
    num_transfer_failures: int = 0
    num_fallbacks: int = 0  # remote prefills redone locally or as a new attempt
    num_rejects: int = 0  # RESOURCE_EXHAUSTED answers
    num_requests_finished: int = 0
    num_expired_jobs: int = 0
    num_stale_notifications: int = 0
    num_incarnation_mismatches: int = 0
    num_checksum_failures: int = 0
    num_duplicate_ids: int = 0
    num_duplicate_publishes: int = 0
    num_accept_failures: int = 0
    num_rejected_jobs: int = 0
    num_clock_skew_jobs: int = 0
    num_offload_local: int = 0
    num_offload_remote: int = 0
    num_remote_attempts: int = 0
    num_lease_expiries: int = 0
    num_lease_renewals: int = 0
    num_declined_jobs: int = 0
    num_role_switches: int = 0


@dataclass(frozen=True)
class PeerClock:
    """A peer's clock minus ours lies in [offset_min_ms, offset_max_ms] (measured)."""

    worker_id: str
    offset_min_ms: float
    offset_max_ms: float
    excluded: bool  # provably off by more than the skew margin: gets no jobs


@dataclass(frozen=True)
class WorkerStatus:
    role: str  # "prefill" or "decode"
    worker_id: str
    config_hash: str
    state: str  # SERVING or DRAINING
    engine: EngineStats  # the latest snapshot (pages, queue depth, running)
    num_in_flight: int  # Generate calls open on this server (prefill: jobs)
    uptime_s: float
    counters: StatusCounters = field(default_factory=StatusCounters)
    # why the last reload was refused, or the changed fields that need a restart;
    # "" when the file is fully in force (ReloadResult.status_note)
    config_reload_error: str = ""
    model_fingerprint: str = ""
    incarnation: str = ""
    peer_clocks: tuple[PeerClock, ...] = ()
    # decode: the splitserve-policy revision in force (0: the file alone) and why the
    # newest value was refused ("" when it is in force)
    policy_revision: int = 0
    policy_error: str = ""


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    grpc_address: str
    num_pages: int
    page_size: int  # tokens per page
    dtype: str  # KV dtype
    model_fingerprint: str


@dataclass(frozen=True)
class ConfigView:
    yaml: str  # the config in force, in the daemon's config file format
    config_hash: str  # as WorkerStatus.config_hash


class RoleSwitchOutcome(Enum):
    SWITCHED = "switched"  # the requested role is in force
    UNCHANGED = "unchanged"  # it already was: nothing drained
    TIMED_OUT = "timed_out"  # the grace ran out with work in flight: the old role stays


@dataclass(frozen=True)
class RoleChange:
    """What Admin.SetRole did."""

    outcome: RoleSwitchOutcome
    role: str  # in force after the call
    previous_role: str
    state: str  # SERVING or DRAINING
    num_in_flight: int = 0  # left when the grace ran out


class ServingGate(Protocol):
    """The health service as a role switch drives it (control.health.HealthStatus)."""

    def set_serving(self, serving: bool) -> None: ...

    def set_enabled(self, service: str, enabled: bool) -> None: ...


@runtime_checkable
class RoleSwitching(Protocol):
    """A backend whose daemon can switch roles in place (a worker: prefill ⇄ decode)."""

    async def set_role(self, role: str, grace_s: float, gate: ServingGate | None) -> RoleChange:
        """InvalidRequest for an unknown role, RoleSwitchBusy while another switch runs."""
        ...


class AdminBackend(Protocol):
    """A daemon as the Admin service sees it.

    `tracker` counts the server's Generate calls; `is_draining()` is asked on
    every Generate call, so it must be cheap and must not block.
    """

    tracker: RequestTracker

    def is_draining(self) -> bool: ...

    async def status(self) -> WorkerStatus: ...

    async def list_workers(self) -> list[WorkerInfo]: ...

    async def drain(self, grace_s: float) -> str:
        """Stop admitting requests, wait up to `grace_s` for in-flight ones; the new state."""
        ...

    async def resume(self) -> str:
        """Admit requests again; the new state."""
        ...

    async def reload(self) -> ReloadResult:
        """Re-read the config file now, as SIGHUP does (config/reload.py). A refused
        file is the result's `error`; raises `ReloadUnsupported` without a file."""
        ...

    async def config(self) -> ConfigView:
        """The config in force."""
        ...
