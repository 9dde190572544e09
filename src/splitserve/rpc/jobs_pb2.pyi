from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillJob(_message.Message):
    __slots__ = ("request_id", "attempt", "token_ids", "sampling", "priority", "dest_worker_id", "dest_page_ids", "num_cached_tokens", "lease_deadline_unix_ns", "publish_time_unix_ns", "trace_id", "dest_incarnation", "label", "want_checksums")
    class SamplingParams(_message.Message):
        __slots__ = ("temperature", "top_p", "top_k", "seed", "max_tokens", "stop_token_ids")
        TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
        TOP_P_FIELD_NUMBER: _ClassVar[int]
        TOP_K_FIELD_NUMBER: _ClassVar[int]
        SEED_FIELD_NUMBER: _ClassVar[int]
        MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
        STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
        temperature: float
        top_p: float
        top_k: int
        seed: int
        max_tokens: int
        stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DEST_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    WANT_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: PrefillJob.SamplingParams
    priority: str
    dest_worker_id: str
    dest_page_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    lease_deadline_unix_ns: int
    publish_time_unix_ns: int
    trace_id: str
    dest_incarnation: str
    label: str
    want_checksums: bool
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[PrefillJob.SamplingParams, _Mapping]] = ..., priority: _Optional[str] = ..., dest_worker_id: _Optional[str] = ..., dest_page_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., lease_deadline_unix_ns: _Optional[int] = ..., publish_time_unix_ns: _Optional[int] = ..., trace_id: _Optional[str] = ..., dest_incarnation: _Optional[str] = ..., label: _Optional[str] = ..., want_checksums: _Optional[bool] = ...) -> None: ...

class KVReady(_message.Message):
    __slots__ = ("request_id", "attempt", "first_token", "prefill_worker_id", "dequeue_time_unix_ns", "prefill_start_unix_ns", "prefill_end_unix_ns", "dest_incarnation", "page_checksums")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DEQUEUE_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DEST_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PAGE_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    first_token: int
    prefill_worker_id: str
    dequeue_time_unix_ns: int
    prefill_start_unix_ns: int
    prefill_end_unix_ns: int
    dest_incarnation: str
    page_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., first_token: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ..., dequeue_time_unix_ns: _Optional[int] = ..., prefill_start_unix_ns: _Optional[int] = ..., prefill_end_unix_ns: _Optional[int] = ..., dest_incarnation: _Optional[str] = ..., page_checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "dest_incarnation", "prefill_worker_id", "wanted_deadline_unix_ns", "decline", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DEST_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WANTED_DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    dest_incarnation: str
    prefill_worker_id: str
    wanted_deadline_unix_ns: int
    decline: bool
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., dest_incarnation: _Optional[str] = ..., prefill_worker_id: _Optional[str] = ..., wanted_deadline_unix_ns: _Optional[int] = ..., decline: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("granted", "deadline_unix_ns", "refusal")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    deadline_unix_ns: int
    refusal: str
    def __init__(self, granted: _Optional[bool] = ..., deadline_unix_ns: _Optional[int] = ..., refusal: _Optional[str] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "role", "tokens_per_s", "queue_depth", "num_kv_pages_used", "num_kv_pages_free", "num_kv_pages_quarantined", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "num_local_prefills", "num_remote_prefills", "num_rejects", "timestamp_unix_ns", "window_s", "queue_p50_ms", "queue_p99_ms", "prefill_rates", "decode_steps", "transfer_bytes_per_s", "num_running", "kv_usage", "prefill_tokens_per_s", "prefill_rate_tokens_per_s", "mean_prefill_tokens", "tpot_p99_ms")
    class PrefillRate(_message.Message):
        __slots__ = ("min_tokens", "max_tokens", "tokens_per_s", "num_samples")
        MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
        MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
        TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
        NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
        min_tokens: int
        max_tokens: int
        tokens_per_s: float
        num_samples: int
        def __init__(self, min_tokens: _Optional[int] = ..., max_tokens: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...
    class DecodeStep(_message.Message):
        __slots__ = ("min_batch", "max_batch", "mean_ms", "mean_context_tokens", "num_samples")
        MIN_BATCH_FIELD_NUMBER: _ClassVar[int]
        MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
        MEAN_MS_FIELD_NUMBER: _ClassVar[int]
        MEAN_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
        NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
        min_batch: int
        max_batch: int
        mean_ms: float
        mean_context_tokens: float
        num_samples: int
        def __init__(self, min_batch: _Optional[int] = ..., max_batch: _Optional[int] = ..., mean_ms: _Optional[float] = ..., mean_context_tokens: _Optional[float] = ..., num_samples: _Optional[int] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_PAGES_QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P50_MS_FIELD_NUMBER: _ClassVar[int]
    ITL_P99_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_LOCAL_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    NUM_REMOTE_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_P50_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_P99_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_RATES_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_RATE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEAN_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TPOT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    tokens_per_s: float
    queue_depth: int
    num_kv_pages_used: int
    num_kv_pages_free: int
    num_kv_pages_quarantined: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    num_local_prefills: int
    num_remote_prefills: int
    num_rejects: int
    timestamp_unix_ns: int
    window_s: float
    queue_p50_ms: float
    queue_p99_ms: float
    prefill_rates: _containers.RepeatedCompositeFieldContainer[WorkerStats.PrefillRate]
    decode_steps: _containers.RepeatedCompositeFieldContainer[WorkerStats.DecodeStep]
    transfer_bytes_per_s: float
    num_running: int
    kv_usage: float
    prefill_tokens_per_s: float
    prefill_rate_tokens_per_s: float
    mean_prefill_tokens: float
    tpot_p99_ms: float
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., queue_depth: _Optional[int] = ..., num_kv_pages_used: _Optional[int] = ..., num_kv_pages_free: _Optional[int] = ..., num_kv_pages_quarantined: _Optional[int] = ..., ttft_p50_ms: _Optional[float] = ..., ttft_p99_ms: _Optional[float] = ..., itl_p50_ms: _Optional[float] = ..., itl_p99_ms: _Optional[float] = ..., num_local_prefills: _Optional[int] = ..., num_remote_prefills: _Optional[int] = ..., num_rejects: _Optional[int] = ..., timestamp_unix_ns: _Optional[int] = ..., window_s: _Optional[float] = ..., queue_p50_ms: _Optional[float] = ..., queue_p99_ms: _Optional[float] = ..., prefill_rates: _Optional[_Iterable[_Union[WorkerStats.PrefillRate, _Mapping]]] = ..., decode_steps: _Optional[_Iterable[_Union[WorkerStats.DecodeStep, _Mapping]]] = ..., transfer_bytes_per_s: _Optional[float] = ..., num_running: _Optional[int] = ..., kv_usage: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., prefill_rate_tokens_per_s: _Optional[float] = ..., mean_prefill_tokens: _Optional[float] = ..., tpot_p99_ms: _Optional[float] = ...) -> None: ...

class KVCacheEvents(_message.Message):
    __slots__ = ("worker_id", "incarnation", "seq", "page_size", "reset", "stored", "removed")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    incarnation: str
    seq: int
    page_size: int
    reset: bool
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, worker_id: _Optional[str] = ..., incarnation: _Optional[str] = ..., seq: _Optional[int] = ..., page_size: _Optional[int] = ..., reset: _Optional[bool] = ..., stored: _Optional[_Iterable[bytes]] = ..., removed: _Optional[_Iterable[bytes]] = ...) -> None: ...
