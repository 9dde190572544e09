"""Admin.SetRole: switch a worker between prefill and decode in place.

The role is an object on the worker core (`DecodeService` or `PrefillService`);
`RoleSwitcher` holds the current one and swaps it. Life cycle of a switch:
1. the role is checked (unknown → INVALID_ARGUMENT); a second switch while one runs
   is refused (FAILED_PRECONDITION), so two never overlap; the role already in force
   is an OK answer that touches nothing (no drain);
2. health NOT_SERVING and the drain of Admin.Drain: Generate calls get UNAVAILABLE,
   those in flight (decode, remote prefills included) finish; a prefill role stops
   pulling jobs and finishes the ones it holds. Work still in flight when the grace
   runs out: the old role stays and serves again (TIMED_OUT), nothing is cut off;
3. the old role stops (decode: KV events, KVReady receiver, lease desk, policy and
   registry watches; prefill: its job consumers, holding no job by now);
4. `WorkerCore.switch_role`: the role of the config, the stats subject and the
   `WorkerDescriptor`, re-put in `splitserve-workers` at once. Decode workers then
   send this worker jobs (or stop: a prefill worker that switched is not "gone", its
   jobs were done), routers send it Generate calls (or stop). The incarnation stays:
   landing pages the decode role quarantined stay fenced in the engine until their
   lease ends, whatever the role;
5. the new role starts, Generation's health follows it (NOT_SERVING on a prefill
   worker), resume: SERVING. `listeners` (systemd STATUS) hear the outcome. A failure in 3-5 restores the old role (best effort)
   and is raised to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol, cast

from splitserve.control.backend import (
    RoleChange,
    RoleSwitchOutcome,
    ServingGate,
)
from splitserve.control.errors import RoleSwitchBusy, RoleUnavailable
from splitserve.control.generation import GENERATION_SERVICE
from splitserve.engine.errors import InvalidRequest
from splitserve.ingress import GenerateRequest, GenerationChunk
from splitserve.worker.core import WorkerCore, WorkerRole
from splitserve.worker.decode import DecodeService
from splitserve.worker.prefill import PrefillService
from splitserve.worker.remote import RemotePrefillClient

log = logging.getLogger(__name__)

ROLES: tuple[WorkerRole, ...] = ("decode", "prefill")

RoleService = DecodeService | PrefillService


def check_role(role: str) -> WorkerRole:
    """`role` if it is one (InvalidRequest naming the field otherwise)."""
    if role not in ROLES:
        raise InvalidRequest("role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return cast(WorkerRole, role)


def make_role(core: WorkerCore, role: str) -> RoleService:
    return DecodeService(core) if check_role(role) == "decode" else PrefillService(core)


class Drainable(Protocol):
    """The admin backend as a switch drains and resumes it (worker/admin.py)."""

    async def drain(self, grace_s: float) -> str: ...

    async def resume_after_switch(self) -> str: ...

    @property
    def num_in_flight(self) -> int: ...

    @property
    def state(self) -> str: ...


class RoleSwitcher:
    """The worker's role object, and its switch. Also the worker's `GenerationService`:
    Generate goes to the decode role, or gets UNAVAILABLE (RoleUnavailable) while the
    worker is a prefill worker. `listeners` hear of each switch that drained (SWITCHED
    or TIMED_OUT)."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core
        self.service: RoleService = make_role(core, core.role)
        self.listeners: list[Callable[[RoleChange], None]] = []
        self._lock = asyncio.Lock()

    @property
    def role(self) -> str:
        return self.core.role

    @property
    def is_switching(self) -> bool:
        return self._lock.locked()

    # --- the current role, for the daemon and the admin backend ---------------------
    async def start(self) -> None:
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()

    async def drain(self) -> None:
        if isinstance(self.service, PrefillService):
            await self.service.drain()

    def resume(self) -> None:
        if isinstance(self.service, PrefillService):
            self.service.resume()

    @property
    def num_in_flight(self) -> int:
        return self.service.num_in_flight

    @property
    def remote(self) -> RemotePrefillClient | None:
        """The decode role's remote prefill client (policy, peer clocks), else None."""
        return self.service.remote if isinstance(self.service, DecodeService) else None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        service = self.service
        if not isinstance(service, DecodeService):
            raise RoleUnavailable(self.core.role, request.request_id)
        async for chunk in service.generate(request):
            yield chunk

    # --- the switch ------------------------------------------------------------------
    async def switch(self, role: str, grace_s: float, admin: Drainable,
                     gate: ServingGate | None) -> RoleChange:
        """Steps 1-5 of the module docstring; `gate` is the server's health."""
        role = check_role(role)
        previous = self.core.role
        if self._lock.locked():
            raise RoleSwitchBusy(previous, role)
        async with self._lock:
            wid = self.core.worker_id
            if role == previous:
                log.info("worker %s: already %s; role unchanged", wid, role)
                return RoleChange(RoleSwitchOutcome.UNCHANGED, role, previous, admin.state)
            log.info("worker %s: switching %s → %s: draining (grace %.1f s)", wid, previous,
                     role, grace_s)
            if gate is not None:
                gate.set_serving(False)
            await admin.drain(grace_s)
            left = admin.num_in_flight
            if left:
                log.warning("worker %s: %d requests or jobs still in flight after %.1f s; "
                            "staying %s", wid, left, grace_s, previous)
                state = await self._resume(admin, gate)
                return self._tell(RoleChange(RoleSwitchOutcome.TIMED_OUT, previous, previous,
                                             state, left))
            await self._swap(role)
            state = await self._resume(admin, gate)
            self.core.counters.num_role_switches += 1
            log.info("worker %s: switched %s → %s; %s", wid, previous, role, state)
            return self._tell(RoleChange(RoleSwitchOutcome.SWITCHED, role, previous, state))

    def _tell(self, change: RoleChange) -> RoleChange:
        for listener in self.listeners:
            listener(change)
        return change

    async def _swap(self, role: WorkerRole) -> None:
        """Steps 3-5 on a drained worker; on failure, back to the old role."""
        previous, old = self.core.role, self.service
        wid = self.core.worker_id
        log.info("worker %s: stopping the %s role", wid, previous)
        await old.stop()
        try:
            await self._become(role)
        except Exception:
            log.exception("worker %s: starting the %s role failed; restoring %s", wid, role,
                          previous)
            await self._become(previous)
            raise

    async def _become(self, role: WorkerRole) -> None:
        wid = self.core.worker_id
        await self.core.switch_role(role)
        log.info("worker %s: registered as %s (incarnation %s)", wid, role,
                 self.core.incarnation)
        service = make_role(self.core, role)
        try:
            await service.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await service.stop()
            raise
        self.service = service
        log.info("worker %s: %s role started", wid, role)

    async def _resume(self, admin: Drainable, gate: ServingGate | None) -> str:
        state = await admin.resume_after_switch()
        if gate is not None:
            gate.set_enabled(GENERATION_SERVICE, self.core.role == "decode")
            gate.set_serving(True)
        return state
