from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlannerMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLANNER_MODE_UNSPECIFIED: _ClassVar[PlannerMode]
    PLANNER_MODE_AUTO: _ClassVar[PlannerMode]
    PLANNER_MODE_ADVISE: _ClassVar[PlannerMode]
    PLANNER_MODE_OFF: _ClassVar[PlannerMode]
PLANNER_MODE_UNSPECIFIED: PlannerMode
PLANNER_MODE_AUTO: PlannerMode
PLANNER_MODE_ADVISE: PlannerMode
PLANNER_MODE_OFF: PlannerMode

class Thresholds(_message.Message):
    __slots__ = ("prefill_length_threshold", "moderate_length_threshold", "prefill_queue_max")
    PREFILL_LENGTH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODERATE_LENGTH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_QUEUE_MAX_FIELD_NUMBER: _ClassVar[int]
    prefill_length_threshold: int
    moderate_length_threshold: int
    prefill_queue_max: int
    def __init__(self, prefill_length_threshold: _Optional[int] = ..., moderate_length_threshold: _Optional[int] = ..., prefill_queue_max: _Optional[int] = ...) -> None: ...

class RoleCount(_message.Message):
    __slots__ = ("role", "current", "target")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    role: str
    current: int
    target: int
    def __init__(self, role: _Optional[str] = ..., current: _Optional[int] = ..., target: _Optional[int] = ...) -> None: ...

class PlanView(_message.Message):
    __slots__ = ("planner_id", "mode", "leader", "timestamp_unix_s", "roles", "thresholds_in_force", "thresholds", "reasons", "actions", "actuator", "actuator_error", "policy_revision")
    PLANNER_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_IN_FORCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    ACTUATOR_FIELD_NUMBER: _ClassVar[int]
    ACTUATOR_ERROR_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    planner_id: str
    mode: PlannerMode
    leader: bool
    timestamp_unix_s: float
    roles: _containers.RepeatedCompositeFieldContainer[RoleCount]
    thresholds_in_force: Thresholds
    thresholds: Thresholds
    reasons: _containers.RepeatedScalarFieldContainer[str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    actuator: str
    actuator_error: str
    policy_revision: int
    def __init__(self, planner_id: _Optional[str] = ..., mode: _Optional[_Union[PlannerMode, str]] = ..., leader: _Optional[bool] = ..., timestamp_unix_s: _Optional[float] = ..., roles: _Optional[_Iterable[_Union[RoleCount, _Mapping]]] = ..., thresholds_in_force: _Optional[_Union[Thresholds, _Mapping]] = ..., thresholds: _Optional[_Union[Thresholds, _Mapping]] = ..., reasons: _Optional[_Iterable[str]] = ..., actions: _Optional[_Iterable[str]] = ..., actuator: _Optional[str] = ..., actuator_error: _Optional[str] = ..., policy_revision: _Optional[int] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetModeRequest(_message.Message):
    __slots__ = ("mode",)
    MODE_FIELD_NUMBER: _ClassVar[int]
    mode: PlannerMode
    def __init__(self, mode: _Optional[_Union[PlannerMode, str]] = ...) -> None: ...

class SetModeResponse(_message.Message):
    __slots__ = ("mode", "previous")
    MODE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    mode: PlannerMode
    previous: PlannerMode
    def __init__(self, mode: _Optional[_Union[PlannerMode, str]] = ..., previous: _Optional[_Union[PlannerMode, str]] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("timestamp_unix_s", "key", "old_value", "new_value", "why", "revision")
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OLD_VALUE_FIELD_NUMBER: _ClassVar[int]
    NEW_VALUE_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    timestamp_unix_s: float
    key: str
    old_value: str
    new_value: str
    why: str
    revision: int
    def __init__(self, timestamp_unix_s: _Optional[float] = ..., key: _Optional[str] = ..., old_value: _Optional[str] = ..., new_value: _Optional[str] = ..., why: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("plans", "audit")
    PLANS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[PlanView]
    audit: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, plans: _Optional[_Iterable[_Union[PlanView, _Mapping]]] = ..., audit: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...
