"""The Admin service's view of a worker of either role (and of its role switch)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from splitserve.config.daemon import WorkerConfig, config_to_yaml
from splitserve.config.reload import ConfigReloader, ReloadResult
from splitserve.control.backend import (
    DRAINING,
    SERVING,
    ConfigView,
    PeerClock,
    RoleChange,
    ServingGate,
    StatusCounters,
    WorkerInfo,
    WorkerStatus,
)
from splitserve.control.errors import ReloadUnsupported, RoleSwitchBusy
from splitserve.control.tracker import RequestTracker
from splitserve.redact import redact_url
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.worker.core import WorkerCore
from splitserve.worker.policy import PolicyView
from splitserve.worker.role_switch import RoleSwitcher

log = logging.getLogger(__name__)

# WorkerCounters fields reported under the same name in GetStatus.
_SHARED_COUNTERS = (
    "num_local_prefills", "num_remote_prefills", "num_fallbacks", "num_expired_jobs",
    "num_stale_notifications", "num_incarnation_mismatches", "num_checksum_failures",
    "num_duplicate_ids", "num_duplicate_publishes", "num_accept_failures", "num_rejected_jobs",
    "num_clock_skew_jobs", "num_offload_local", "num_offload_remote", "num_remote_attempts",
    "num_lease_expiries", "num_lease_renewals", "num_declined_jobs", "num_role_switches",
)


class WorkerAdminBackend:
    """`control.backend.AdminBackend` and `RoleSwitching` for a worker daemon (decode or
    prefill role, switched by SetRole: worker/role_switch.py).

    With a `reloader` (a daemon started from a config file), the config hash and
    the reload error come from it; without one, Reload is FAILED_PRECONDITION.
    """

    def __init__(self, core: WorkerCore, roles: RoleSwitcher,
                 reloader: ConfigReloader[WorkerConfig] | None = None,
                 config_hash: str = "") -> None:
        self.core = core
        self.roles = roles
        self.reloader = reloader
        self._config_hash = config_hash
        self.tracker = RequestTracker()
        self._draining = False

    def is_draining(self) -> bool:
        return self._draining

    @property
    def state(self) -> str:
        return DRAINING if self._draining else SERVING

    @property
    def num_in_flight(self) -> int:
        """Generate calls open on the server, or (prefill) jobs held."""
        return max(self.tracker.num_in_flight, self.roles.num_in_flight)

    @property
    def config_hash(self) -> str:
        return self.reloader.config_hash if self.reloader is not None else self._config_hash

    async def reload(self) -> ReloadResult:
        if self.reloader is None:
            raise ReloadUnsupported("this worker was started without a config file")
        return self.reloader.reload("Admin.Reload")

    async def config(self) -> ConfigView:
        config = self.core.config  # the URL may carry a password or a token
        return ConfigView(config_to_yaml(replace(config, nats_url=redact_url(config.nats_url))),
                          self.config_hash)

    async def status(self) -> WorkerStatus:
        core = self.core
        c = core.counters
        transfers = core.agent.counters if core.has_messaging else None
        policy = self._policy()
        return WorkerStatus(
            role=core.role, worker_id=core.worker_id, config_hash=self.config_hash,
            state=self.state, engine=core.engine.stats, num_in_flight=self.num_in_flight,
            uptime_s=time.monotonic() - core.started_s,
            counters=StatusCounters(
                **{name: getattr(c, name) for name in _SHARED_COUNTERS},
                num_transfers=transfers.num_transfers if transfers else 0,
                num_transfer_failures=transfers.num_failures if transfers else 0,
                num_rejects=c.num_rejects + self.tracker.num_rejects,
                num_requests_finished=c.num_finished,
            ),
            config_reload_error=self.reloader.status_note if self.reloader is not None else "",
            model_fingerprint=core.engine.info.fingerprint,
            incarnation=core.incarnation,
            peer_clocks=self._peer_clocks(),
            policy_revision=policy.revision if policy is not None else 0,
            policy_error=policy.error if policy is not None else "",
        )

    def _policy(self) -> PolicyView | None:
        """The live routing policy of a decode worker (prefill workers have none)."""
        remote = self.roles.remote
        return remote.policy if remote is not None else None

    def _peer_clocks(self) -> tuple[PeerClock, ...]:
        remote = self.roles.remote  # decode workers measure them
        if remote is None:
            return ()
        margin_s = self.core.config.lease.skew_margin_s
        clocks = []
        for worker_id in remote.clocks.peer_ids:
            bounds = remote.clocks.bounds(worker_id)
            if bounds is not None:
                clocks.append(PeerClock(worker_id, bounds.min_s * 1e3, bounds.max_s * 1e3,
                                        remote.clocks.is_excluded(worker_id, margin_s)))
        return tuple(clocks)

    async def list_workers(self) -> list[WorkerInfo]:
        if not self.core.has_messaging:
            return []
        registry = self.core.registry
        workers = []
        for worker_id, data in sorted((await registry.list()).items()):
            try:
                d = WorkerDescriptor.FromString(data)
            except Exception:  # noqa: BLE001 (a corrupt entry must not break the listing)
                log.warning("registry entry %s is not a WorkerDescriptor", worker_id)
                continue
            workers.append(WorkerInfo(
                worker_id=worker_id, role=d.role, grpc_address=d.grpc_address,
                num_pages=d.num_pages, page_size=d.geometry.page_size, dtype=d.dtype,
                model_fingerprint=d.model_fingerprint))
        return workers

    async def drain(self, grace_s: float) -> str:
        self._draining = True
        await self.roles.drain()
        deadline = time.monotonic() + grace_s
        await self.tracker.wait_idle(grace_s)
        while self.roles.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return DRAINING

    async def resume(self) -> str:
        if self.roles.is_switching:  # the switch resumes when it is done
            raise RoleSwitchBusy(self.core.role, self.core.role)
        return await self.resume_after_switch()

    async def resume_after_switch(self) -> str:
        self._draining = False
        self.roles.resume()
        return SERVING

    async def set_role(self, role: str, grace_s: float, gate: ServingGate | None) -> RoleChange:
        change = await self.roles.switch(role, grace_s, self, gate)
        if self.reloader is not None:  # a reload diffs against this: the role is no change
            self.reloader.config = self.core.config
        return change

