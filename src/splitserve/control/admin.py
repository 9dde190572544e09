"""`splitserve.v1.Admin` over an `AdminBackend`."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NoReturn

import grpc

from splitserve.control.backend import (
    DRAINING,
    SERVING,
    AdminBackend,
    RoleChange,
    RoleSwitching,
    RoleSwitchOutcome,
    WorkerInfo,
    WorkerStatus,
)
from splitserve.control.errors import RoleSwitchUnsupported
from splitserve.control.health import HealthStatus
from splitserve.control.status import status_for
from splitserve.engine.errors import InvalidRequest
from splitserve.rpc import admin_pb2 as pb
from splitserve.rpc import admin_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_GRACE_S = 3600.0

_STATES = {SERVING: pb.SERVING_STATE_SERVING, DRAINING: pb.SERVING_STATE_DRAINING}
_OUTCOMES = {RoleSwitchOutcome.SWITCHED: pb.ROLE_SWITCH_OUTCOME_SWITCHED,
             RoleSwitchOutcome.UNCHANGED: pb.ROLE_SWITCH_OUTCOME_UNCHANGED,
             RoleSwitchOutcome.TIMED_OUT: pb.ROLE_SWITCH_OUTCOME_TIMED_OUT}


class AdminServicer(pb_grpc.AdminServicer):
    """Drain, Resume and SetRole also flip the health service (when given one)."""

    def __init__(self, backend: AdminBackend, health: HealthStatus | None = None) -> None:
        self.backend = backend
        self.health = health

    async def GetStatus(self, request: pb.GetStatusRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        try:
            return status_to_proto(await self.backend.status())
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)

    async def ListWorkers(self, request: pb.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> pb.ListWorkersResponse:
        try:
            workers = await self.backend.list_workers()
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.ListWorkersResponse(workers=[worker_to_proto(w) for w in workers])

    async def Drain(self, request: pb.DrainRequest,
                    context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        try:
            state = await drain(self.backend, self.health, _grace_s(request.grace_s))
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.DrainResponse(state=_STATES[state],
                                num_in_flight=self.backend.tracker.num_in_flight)

    async def SetRole(self, request: pb.SetRoleRequest,
                      context: grpc.aio.ServicerContext) -> pb.SetRoleResponse:
        try:
            change = await set_role(self.backend, self.health, request.role,
                                    _grace_s(request.grace_s))
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.SetRoleResponse(role=change.role, previous_role=change.previous_role,
                                  state=_STATES[change.state],
                                  num_in_flight=change.num_in_flight,
                                  outcome=_OUTCOMES[change.outcome])

    async def Resume(self, request: pb.ResumeRequest,
                     context: grpc.aio.ServicerContext) -> pb.ResumeResponse:
        try:
            state = await resume(self.backend, self.health)
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.ResumeResponse(state=_STATES[state])

    async def Reload(self, request: pb.ReloadRequest,
                     context: grpc.aio.ServicerContext) -> pb.ReloadResponse:
        try:
            result = await self.backend.reload()
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.ReloadResponse(applied_fields=result.applied_fields,
                                 restart_fields=result.restart_fields, error=result.error,
                                 config_hash=result.config_hash)

    async def GetConfig(self, request: pb.GetConfigRequest,
                        context: grpc.aio.ServicerContext) -> pb.GetConfigResponse:
        try:
            view = await self.backend.config()
        except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
            await _abort(context, exc)
        return pb.GetConfigResponse(config_yaml=view.yaml, config_hash=view.config_hash)


async def drain(backend: AdminBackend, health: HealthStatus | None, grace_s: float) -> str:
    """Health first (so balancers stop routing at once), then the backend's drain."""
    if health is not None:
        health.set_serving(False)
    return await backend.drain(grace_s)


async def set_role(backend: AdminBackend, health: HealthStatus | None, role: str,
                   grace_s: float) -> RoleChange:
    """Switch the daemon's role in place; the backend drives health through the switch
    (NOT_SERVING while it drains, Generation following the new role)."""
    if not isinstance(backend, RoleSwitching):
        raise RoleSwitchUnsupported("this daemon has no prefill or decode role")
    return await backend.set_role(role, grace_s, health)


async def resume(backend: AdminBackend, health: HealthStatus | None) -> str:
    state = await backend.resume()
    if health is not None:
        health.set_serving(state == SERVING)
    return state


def _grace_s(grace_s: float) -> float:
    if not math.isfinite(grace_s) or not 0 <= grace_s <= MAX_GRACE_S:
        raise InvalidRequest("grace_s", f"grace_s must be in [0, {MAX_GRACE_S:g}], "
                             f"got {grace_s}")
    return grace_s


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    status = status_for(exc)
    log.info("admin call failed: %s %s", status.code.name, status.message)
    await context.abort(status.code, status.message, status.trailing_metadata())
    raise AssertionError("context.abort returned")  # it always raises


def status_to_proto(status: WorkerStatus) -> pb.GetStatusResponse:
    c, e = status.counters, status.engine
    return pb.GetStatusResponse(
        role=status.role, worker_id=status.worker_id, config_hash=status.config_hash,
        state=_STATES[status.state], num_pages_used=e.num_pages_used,
        num_pages_free=e.num_pages_free, num_pages_quarantined=e.num_pages_quarantined,
        num_pages_total=e.num_pages_total, num_waiting=e.queue_depth,
        num_running=e.num_running, num_in_flight=status.num_in_flight,
        counters=pb.GetStatusResponse.Counters(**dataclasses.asdict(c)),
        config_reload_error=status.config_reload_error, uptime_s=status.uptime_s,
        model_fingerprint=status.model_fingerprint, incarnation=status.incarnation,
        policy_revision=status.policy_revision, policy_error=status.policy_error,
        peer_clocks=[pb.GetStatusResponse.PeerClock(**dataclasses.asdict(p))
                     for p in status.peer_clocks])


def worker_to_proto(info: WorkerInfo) -> pb.WorkerEntry:
    return pb.WorkerEntry(worker_id=info.worker_id, role=info.role,
                          grpc_address=info.grpc_address, num_pages=info.num_pages,
                          page_size=info.page_size, dtype=info.dtype,
                          model_fingerprint=info.model_fingerprint)
