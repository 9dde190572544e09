from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATE_UNSPECIFIED: _ClassVar[ServingState]
    SERVING_STATE_SERVING: _ClassVar[ServingState]
    SERVING_STATE_DRAINING: _ClassVar[ServingState]

class RoleSwitchOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_SWITCH_OUTCOME_UNSPECIFIED: _ClassVar[RoleSwitchOutcome]
    ROLE_SWITCH_OUTCOME_SWITCHED: _ClassVar[RoleSwitchOutcome]
    ROLE_SWITCH_OUTCOME_UNCHANGED: _ClassVar[RoleSwitchOutcome]
    ROLE_SWITCH_OUTCOME_TIMED_OUT: _ClassVar[RoleSwitchOutcome]
SERVING_STATE_UNSPECIFIED: ServingState
SERVING_STATE_SERVING: ServingState
SERVING_STATE_DRAINING: ServingState
ROLE_SWITCH_OUTCOME_UNSPECIFIED: RoleSwitchOutcome
ROLE_SWITCH_OUTCOME_SWITCHED: RoleSwitchOutcome
ROLE_SWITCH_OUTCOME_UNCHANGED: RoleSwitchOutcome
ROLE_SWITCH_OUTCOME_TIMED_OUT: RoleSwitchOutcome

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("role", "worker_id", "config_hash", "state", "num_pages_used", "num_pages_free", "num_pages_quarantined", "num_pages_total", "num_waiting", "num_running", "num_in_flight", "counters", "config_reload_error", "uptime_s", "model_fingerprint", "incarnation", "peer_clocks", "policy_revision", "policy_error")
    class Counters(_message.Message):
        __slots__ = ("num_local_prefills", "num_remote_prefills", "num_transfers", "num_transfer_failures", "num_fallbacks", "num_rejects", "num_requests_finished", "num_expired_jobs", "num_stale_notifications", "num_incarnation_mismatches", "num_checksum_failures", "num_duplicate_ids", "num_duplicate_publishes", "num_accept_failures", "num_rejected_jobs", "num_clock_skew_jobs", "num_offload_local", "num_offload_remote", "num_remote_attempts", "num_lease_expiries", "num_lease_renewals", "num_declined_jobs", "num_role_switches")
        NUM_LOCAL_PREFILLS_FIELD_NUMBER: _ClassVar[int]
        NUM_REMOTE_PREFILLS_FIELD_NUMBER: _ClassVar[int]
        NUM_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
        NUM_TRANSFER_FAILURES_FIELD_NUMBER: _ClassVar[int]
        NUM_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
        NUM_REJECTS_FIELD_NUMBER: _ClassVar[int]
        NUM_REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
        NUM_EXPIRED_JOBS_FIELD_NUMBER: _ClassVar[int]
        NUM_STALE_NOTIFICATIONS_FIELD_NUMBER: _ClassVar[int]
        NUM_INCARNATION_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
        NUM_CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
        NUM_DUPLICATE_IDS_FIELD_NUMBER: _ClassVar[int]
        NUM_DUPLICATE_PUBLISHES_FIELD_NUMBER: _ClassVar[int]
        NUM_ACCEPT_FAILURES_FIELD_NUMBER: _ClassVar[int]
        NUM_REJECTED_JOBS_FIELD_NUMBER: _ClassVar[int]
        NUM_CLOCK_SKEW_JOBS_FIELD_NUMBER: _ClassVar[int]
        NUM_OFFLOAD_LOCAL_FIELD_NUMBER: _ClassVar[int]
        NUM_OFFLOAD_REMOTE_FIELD_NUMBER: _ClassVar[int]
        NUM_REMOTE_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
        NUM_LEASE_EXPIRIES_FIELD_NUMBER: _ClassVar[int]
        NUM_LEASE_RENEWALS_FIELD_NUMBER: _ClassVar[int]
        NUM_DECLINED_JOBS_FIELD_NUMBER: _ClassVar[int]
        NUM_ROLE_SWITCHES_FIELD_NUMBER: _ClassVar[int]
        num_local_prefills: int
        num_remote_prefills: int
        num_transfers: int
        num_transfer_failures: int
        num_fallbacks: int
        num_rejects: int
        num_requests_finished: int
        num_expired_jobs: int
        num_stale_notifications: int
        num_incarnation_mismatches: int
        num_checksum_failures: int
        num_duplicate_ids: int
        num_duplicate_publishes: int
        num_accept_failures: int
        num_rejected_jobs: int
        num_clock_skew_jobs: int
        num_offload_local: int
        num_offload_remote: int
        num_remote_attempts: int
        num_lease_expiries: int
        num_lease_renewals: int
        num_declined_jobs: int
        num_role_switches: int
        def __init__(self, num_local_prefills: _Optional[int] = ..., num_remote_prefills: _Optional[int] = ..., num_transfers: _Optional[int] = ..., num_transfer_failures: _Optional[int] = ..., num_fallbacks: _Optional[int] = ..., num_rejects: _Optional[int] = ..., num_requests_finished: _Optional[int] = ..., num_expired_jobs: _Optional[int] = ..., num_stale_notifications: _Optional[int] = ..., num_incarnation_mismatches: _Optional[int] = ..., num_checksum_failures: _Optional[int] = ..., num_duplicate_ids: _Optional[int] = ..., num_duplicate_publishes: _Optional[int] = ..., num_accept_failures: _Optional[int] = ..., num_rejected_jobs: _Optional[int] = ..., num_clock_skew_jobs: _Optional[int] = ..., num_offload_local: _Optional[int] = ..., num_offload_remote: _Optional[int] = ..., num_remote_attempts: _Optional[int] = ..., num_lease_expiries: _Optional[int] = ..., num_lease_renewals: _Optional[int] = ..., num_declined_jobs: _Optional[int] = ..., num_role_switches: _Optional[int] = ...) -> None: ...
    class PeerClock(_message.Message):
        __slots__ = ("worker_id", "offset_min_ms", "offset_max_ms", "excluded")
        WORKER_ID_FIELD_NUMBER: _ClassVar[int]
        OFFSET_MIN_MS_FIELD_NUMBER: _ClassVar[int]
        OFFSET_MAX_MS_FIELD_NUMBER: _ClassVar[int]
        EXCLUDED_FIELD_NUMBER: _ClassVar[int]
        worker_id: str
        offset_min_ms: float
        offset_max_ms: float
        excluded: bool
        def __init__(self, worker_id: _Optional[str] = ..., offset_min_ms: _Optional[float] = ..., offset_max_ms: _Optional[float] = ..., excluded: _Optional[bool] = ...) -> None: ...
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_RELOAD_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PEER_CLOCKS_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    POLICY_ERROR_FIELD_NUMBER: _ClassVar[int]
    role: str
    worker_id: str
    config_hash: str
    state: ServingState
    num_pages_used: int
    num_pages_free: int
    num_pages_quarantined: int
    num_pages_total: int
    num_waiting: int
    num_running: int
    num_in_flight: int
    counters: GetStatusResponse.Counters
    config_reload_error: str
    uptime_s: float
    model_fingerprint: str
    incarnation: str
    peer_clocks: _containers.RepeatedCompositeFieldContainer[GetStatusResponse.PeerClock]
    policy_revision: int
    policy_error: str
    def __init__(self, role: _Optional[str] = ..., worker_id: _Optional[str] = ..., config_hash: _Optional[str] = ..., state: _Optional[_Union[ServingState, str]] = ..., num_pages_used: _Optional[int] = ..., num_pages_free: _Optional[int] = ..., num_pages_quarantined: _Optional[int] = ..., num_pages_total: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_in_flight: _Optional[int] = ..., counters: _Optional[_Union[GetStatusResponse.Counters, _Mapping]] = ..., config_reload_error: _Optional[str] = ..., uptime_s: _Optional[float] = ..., model_fingerprint: _Optional[str] = ..., incarnation: _Optional[str] = ..., peer_clocks: _Optional[_Iterable[_Union[GetStatusResponse.PeerClock, _Mapping]]] = ..., policy_revision: _Optional[int] = ..., policy_error: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerEntry(_message.Message):
    __slots__ = ("worker_id", "role", "grpc_address", "num_pages", "page_size", "dtype", "model_fingerprint")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    grpc_address: str
    num_pages: int
    page_size: int
    dtype: str
    model_fingerprint: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., grpc_address: _Optional[str] = ..., num_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., dtype: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerEntry]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerEntry, _Mapping]]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_s",)
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    grace_s: float
    def __init__(self, grace_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("state", "num_in_flight")
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    state: ServingState
    num_in_flight: int
    def __init__(self, state: _Optional[_Union[ServingState, str]] = ..., num_in_flight: _Optional[int] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: ServingState
    def __init__(self, state: _Optional[_Union[ServingState, str]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("applied_fields", "restart_fields", "error", "config_hash")
    APPLIED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    applied_fields: _containers.RepeatedScalarFieldContainer[str]
    restart_fields: _containers.RepeatedScalarFieldContainer[str]
    error: str
    config_hash: str
    def __init__(self, applied_fields: _Optional[_Iterable[str]] = ..., restart_fields: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...

class GetConfigRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetConfigResponse(_message.Message):
    __slots__ = ("config_yaml", "config_hash")
    CONFIG_YAML_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    config_yaml: str
    config_hash: str
    def __init__(self, config_yaml: _Optional[str] = ..., config_hash: _Optional[str] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role", "grace_s")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    role: str
    grace_s: float
    def __init__(self, role: _Optional[str] = ..., grace_s: _Optional[float] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("role", "previous_role", "state", "num_in_flight", "outcome")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    role: str
    previous_role: str
    state: ServingState
    num_in_flight: int
    outcome: RoleSwitchOutcome
    def __init__(self, role: _Optional[str] = ..., previous_role: _Optional[str] = ..., state: _Optional[_Union[ServingState, str]] = ..., num_in_flight: _Optional[int] = ..., outcome: _Optional[_Union[RoleSwitchOutcome, str]] = ...) -> None: ...
