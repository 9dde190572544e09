"""KV page transfer between workers: NIXL over its UCX backend, pages addressed by id."""

from __future__ import annotations

from splitserve.transfer.agent import TransferAgent
from splitserve.transfer.coalesce import (
    PageRun,
    coalesce_page_runs,
    format_page_ids,
    validate_page_ids,
)
from splitserve.transfer.counters import LatencyStats, TransferCounters
from splitserve.transfer.descriptor import (
    TRANSFER_PROTOCOL_VERSION,
    PoolLayout,
    build_descriptor,
    check_compatible,
    layout_from_descriptor,
)
from splitserve.transfer.errors import (
    DescriptorMismatch,
    InvalidDescriptor,
    InvalidPageIds,
    TransferError,
    TransferFailed,
    UnknownPeer,
)

__all__ = [
    "TRANSFER_PROTOCOL_VERSION",
    "DescriptorMismatch",
    "InvalidDescriptor",
    "InvalidPageIds",
    "LatencyStats",
    "PageRun",
    "PoolLayout",
    "TransferAgent",
    "TransferCounters",
    "TransferError",
    "TransferFailed",
    "UnknownPeer",
    "build_descriptor",
    "check_compatible",
    "coalesce_page_runs",
    "format_page_ids",
    "layout_from_descriptor",
    "validate_page_ids",
]
