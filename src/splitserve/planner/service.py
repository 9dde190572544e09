"""`splitserve.v1.Planner` over gRPC: the last plan, the mode, the history.

GetPlan and History need scope `admin:read`, SetMode `admin:write` (control/auth.py),
when the planner's `auth` is on. An unknown mode is INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc

from splitserve.control.server import ExtraService
from splitserve.planner.model import Mode, Role, Thresholds
from splitserve.planner.runner import AuditRecord, PlannerRunner, PlanRecord
from splitserve.rpc import planner_pb2 as pb
from splitserve.rpc import planner_pb2_grpc

PLANNER_SERVICE = pb.DESCRIPTOR.services_by_name["Planner"].full_name
MODES = {Mode.AUTO: pb.PLANNER_MODE_AUTO, Mode.ADVISE: pb.PLANNER_MODE_ADVISE,
         Mode.OFF: pb.PLANNER_MODE_OFF}
FROM_PB = {value: mode for mode, value in MODES.items()}


def _thresholds(t: Thresholds | None) -> pb.Thresholds | None:
    if t is None:
        return None
    return pb.Thresholds(prefill_length_threshold=t.prefill_length_threshold,
                         moderate_length_threshold=t.moderate_length_threshold,
                         prefill_queue_max=t.prefill_queue_max)


def plan_view(runner: PlannerRunner, record: PlanRecord) -> pb.PlanView:
    plan = record.plan
    view = pb.PlanView(
        planner_id=runner.planner_id, mode=MODES[record.mode], leader=record.leader,
        timestamp_unix_s=record.timestamp_unix_s,
        roles=[pb.RoleCount(role=role.value, current=record.current.get(role, 0),
                            target=plan.count(role) if plan else 0) for role in Role],
        thresholds_in_force=_thresholds(record.thresholds_in_force),
        thresholds=_thresholds(plan.thresholds if plan else None),
        reasons=[*(plan.reasons if plan else ()), *([record.note] if record.note else [])],
        actions=record.actions, actuator=runner.actuator.kind,
        actuator_error=runner.actuator.error, policy_revision=record.policy_revision)
    return view


def _audit(record: AuditRecord) -> pb.AuditRecord:
    return pb.AuditRecord(timestamp_unix_s=record.timestamp_unix_s, key=record.key,
                          old_value=record.old_value, new_value=record.new_value,
                          why=record.why, revision=record.revision)


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    def __init__(self, runner: PlannerRunner) -> None:
        self.runner = runner

    async def GetPlan(self, request: pb.GetPlanRequest,
                      context: grpc.aio.ServicerContext) -> pb.PlanView:
        view = plan_view(self.runner, self.runner.last)
        view.mode = MODES[self.runner.mode]  # SetMode applies before the next tick
        return view

    async def SetMode(self, request: pb.SetModeRequest,
                      context: grpc.aio.ServicerContext) -> pb.SetModeResponse:
        mode = FROM_PB.get(request.mode)
        if mode is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "mode: must be PLANNER_MODE_AUTO, _ADVISE or _OFF")
            raise AssertionError("unreachable")
        previous = self.runner.set_mode(mode)
        return pb.SetModeResponse(mode=MODES[mode], previous=MODES[previous])

    async def History(self, request: pb.HistoryRequest,
                      context: grpc.aio.ServicerContext) -> pb.HistoryResponse:
        limit = request.limit or None
        plans = list(self.runner.history)[::-1][:limit]
        audit = list(self.runner.audit)[::-1][:limit]
        return pb.HistoryResponse(plans=[plan_view(self.runner, r) for r in plans],
                                  audit=[_audit(r) for r in audit])


def planner_service(runner: PlannerRunner) -> ExtraService:
    servicer = PlannerServicer(runner)
    return ExtraService(PLANNER_SERVICE, lambda server: planner_pb2_grpc
                        .add_PlannerServicer_to_server(servicer, server))
