"""`WorkerDescriptor`: what a peer needs to write into this worker's page pool.

A worker registers its whole KV pool once and publishes one descriptor; a peer
checks compatibility at first contact, loads the NIXL agent metadata, and from
then on addresses pages by id: page `i` lives at `address + i * bytes_per_page`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitserve.engine.kv_pool import KVPool, dtype_name
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.transfer.coalesce import PageRun
from splitserve.transfer.errors import DescriptorMismatch, InvalidDescriptor

TRANSFER_PROTOCOL_VERSION = 1
"""Bumped whenever the page layout or the notification framing changes."""

# Checked in this order at first contact; the first difference is reported.
_CHECKED_FIELDS = ("protocol_version", "model_fingerprint", "dtype")
_CHECKED_GEOMETRY = ("page_size", "num_layers", "num_kv_heads", "head_dim", "bytes_per_page")


@dataclass(frozen=True)
class PoolLayout:
    """Where one worker's page pool lives: one registered region, page-major."""

    mem_type: str  # NIXL segment: "DRAM" or "VRAM"
    address: int
    device_id: int
    bytes_per_page: int
    num_pages: int

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_page * self.num_pages

    def run_rows(self, runs: Sequence[PageRun], side: int) -> np.ndarray:
        """NIXL descriptor rows `(address, num_bytes, device_id)`, one per page run.

        `side` picks the run's start on this pool: 0 for the local start, 1 for the remote.
        """
        table = np.asarray(runs, dtype=np.uint64).reshape(-1, 3)
        rows = np.empty((len(table), 3), dtype=np.uint64)
        page_bytes = np.uint64(self.bytes_per_page)
        rows[:, 0] = np.uint64(self.address) + table[:, side] * page_bytes
        rows[:, 1] = table[:, 2] * page_bytes
        rows[:, 2] = self.device_id
        return rows

    @staticmethod
    def of_pool(pool: KVPool) -> PoolLayout:
        tensor = pool.tensor
        if not tensor.is_contiguous():
            raise ValueError("the KV pool tensor must be contiguous to be registered as one region")
        on_gpu = tensor.device.type == "cuda"
        return PoolLayout(
            mem_type="VRAM" if on_gpu else "DRAM",
            address=tensor.data_ptr(),
            device_id=tensor.get_device() if on_gpu else 0,
            bytes_per_page=pool.geometry.bytes_per_page,
            num_pages=pool.num_pages,
        )


def build_descriptor(
    worker_id: str,
    pool: KVPool,
    layout: PoolLayout,
    model_fingerprint: str,
    agent_metadata: bytes,
    role: str = "",
    grpc_address: str = "",
) -> WorkerDescriptor:
    """The descriptor a worker publishes for its registered pool."""
    geometry = pool.geometry
    return WorkerDescriptor(
        worker_id=worker_id,
        protocol_version=TRANSFER_PROTOCOL_VERSION,
        role=role,
        grpc_address=grpc_address,
        model_fingerprint=model_fingerprint,
        dtype=dtype_name(geometry.dtype),
        geometry=WorkerDescriptor.PageGeometry(
            page_size=geometry.page_size,
            num_layers=geometry.num_layers,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            bytes_per_page=geometry.bytes_per_page,
        ),
        num_pages=pool.num_pages,
        agent_metadata=agent_metadata,
        mem_type=layout.mem_type,
        pool_regions=[
            WorkerDescriptor.MemoryRegion(
                address=layout.address, num_bytes=layout.num_bytes, device_id=layout.device_id
            )
        ],
    )


def check_compatible(local: WorkerDescriptor, remote: WorkerDescriptor) -> None:
    """Refuse a peer whose protocol, model, dtype or page geometry differs from ours.

    Raises `DescriptorMismatch` naming the first differing field.
    """
    for name in _CHECKED_FIELDS:
        local_value, remote_value = getattr(local, name), getattr(remote, name)
        if local_value != remote_value:
            raise DescriptorMismatch(name, local_value, remote_value, remote.worker_id)
    for name in _CHECKED_GEOMETRY:
        local_value, remote_value = getattr(local.geometry, name), getattr(remote.geometry, name)
        if local_value != remote_value:
            raise DescriptorMismatch(name, local_value, remote_value, remote.worker_id)


def layout_from_descriptor(descriptor: WorkerDescriptor) -> PoolLayout:
    """The remote pool's layout; raises `InvalidDescriptor` if it is inconsistent."""
    peer_id = descriptor.worker_id
    if not peer_id:
        raise InvalidDescriptor(peer_id, "empty worker_id")
    if descriptor.mem_type not in ("DRAM", "VRAM"):
        raise InvalidDescriptor(peer_id, f"unknown mem_type {descriptor.mem_type!r}")
    if len(descriptor.pool_regions) != 1:
        raise InvalidDescriptor(
            peer_id, f"expected one pool region, got {len(descriptor.pool_regions)}"
        )
    region = descriptor.pool_regions[0]
    bytes_per_page = descriptor.geometry.bytes_per_page
    if bytes_per_page == 0 or descriptor.num_pages == 0:
        raise InvalidDescriptor(peer_id, "empty page pool")
    if region.num_bytes != bytes_per_page * descriptor.num_pages:
        raise InvalidDescriptor(
            peer_id,
            f"region of {region.num_bytes} bytes does not hold "
            f"{descriptor.num_pages} pages of {bytes_per_page} bytes",
        )
    if not descriptor.agent_metadata:
        raise InvalidDescriptor(peer_id, "no NIXL agent metadata")
    return PoolLayout(
        mem_type=descriptor.mem_type,
        address=region.address,
        device_id=region.device_id,
        bytes_per_page=bytes_per_page,
        num_pages=descriptor.num_pages,
    )
