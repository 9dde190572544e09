from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerDescriptor(_message.Message):
    __slots__ = ("worker_id", "protocol_version", "role", "grpc_address", "model_fingerprint", "dtype", "geometry", "num_pages", "agent_metadata", "mem_type", "pool_regions", "incarnation")
    class PageGeometry(_message.Message):
        __slots__ = ("page_size", "num_layers", "num_kv_heads", "head_dim", "bytes_per_page")
        PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
        NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
        NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
        HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
        BYTES_PER_PAGE_FIELD_NUMBER: _ClassVar[int]
        page_size: int
        num_layers: int
        num_kv_heads: int
        head_dim: int
        bytes_per_page: int
        def __init__(self, page_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., bytes_per_page: _Optional[int] = ...) -> None: ...
    class MemoryRegion(_message.Message):
        __slots__ = ("address", "num_bytes", "device_id")
        ADDRESS_FIELD_NUMBER: _ClassVar[int]
        NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
        DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
        address: int
        num_bytes: int
        device_id: int
        def __init__(self, address: _Optional[int] = ..., num_bytes: _Optional[int] = ..., device_id: _Optional[int] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    MEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    POOL_REGIONS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    protocol_version: int
    role: str
    grpc_address: str
    model_fingerprint: str
    dtype: str
    geometry: WorkerDescriptor.PageGeometry
    num_pages: int
    agent_metadata: bytes
    mem_type: str
    pool_regions: _containers.RepeatedCompositeFieldContainer[WorkerDescriptor.MemoryRegion]
    incarnation: str
    def __init__(self, worker_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., role: _Optional[str] = ..., grpc_address: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., geometry: _Optional[_Union[WorkerDescriptor.PageGeometry, _Mapping]] = ..., num_pages: _Optional[int] = ..., agent_metadata: _Optional[bytes] = ..., mem_type: _Optional[str] = ..., pool_regions: _Optional[_Iterable[_Union[WorkerDescriptor.MemoryRegion, _Mapping]]] = ..., incarnation: _Optional[str] = ...) -> None: ...
