"""Transfer-layer pieces that need no peer: coalescing, id validation, descriptors, counters."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from splitserve.engine.kv_pool import PageGeometry
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.transfer import (
    TRANSFER_PROTOCOL_VERSION,
    DescriptorMismatch,
    InvalidDescriptor,
    InvalidPageIds,
    LatencyStats,
    PoolLayout,
    TransferCounters,
    check_compatible,
    coalesce_page_runs,
    format_page_ids,
    layout_from_descriptor,
    validate_page_ids,
)

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("local_ids", "remote_ids", "expected"),
    [
        ([], [], []),
        ([5], [9], [(5, 9, 1)]),
        ([0, 1, 2, 3], [10, 11, 12, 13], [(0, 10, 4)]),
        ([4, 5, 6, 9], [0, 1, 2, 3], [(4, 0, 3), (9, 3, 1)]),
        # contiguous locally but not remotely: every page is its own run
        ([0, 1, 2], [7, 3, 8], [(0, 7, 1), (1, 3, 1), (2, 8, 1)]),
        # descending ids never coalesce
        ([3, 2, 1], [3, 2, 1], [(3, 3, 1), (2, 2, 1), (1, 1, 1)]),
        ([1, 2, 8, 9, 10, 4], [20, 21, 22, 23, 24, 0], [(1, 20, 2), (8, 22, 3), (4, 0, 1)]),
    ],
)
def test_coalesce_page_runs_examples(
    local_ids: list[int], remote_ids: list[int], expected: list[tuple[int, int, int]]
) -> None:
    assert coalesce_page_runs(local_ids, remote_ids) == expected


def test_coalesce_page_runs_matches_pairwise_breaks_on_random_ids() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        n = rng.randint(1, 40)
        local = sorted(rng.sample(range(64), n)) if rng.random() < 0.5 else rng.sample(range(64), n)
        remote = sorted(rng.sample(range(64), n))
        runs = coalesce_page_runs(local, remote)
        breaks = sum(
            1
            for i in range(1, n)
            if not (local[i] == local[i - 1] + 1 and remote[i] == remote[i - 1] + 1)
        )
        assert len(runs) == breaks + 1
        expanded = [(ls + k, rs + k) for ls, rs, count in runs for k in range(count)]
        assert expanded == list(zip(local, remote))


@pytest.mark.parametrize(
    ("local_ids", "remote_ids", "reason"),
    [
        ([0, 1], [0], "2 local ids but 1 remote ids"),
        ([], [], "no pages"),
        ([0, 16], [0, 1], "local ids out of range [0, 16): [16]"),
        ([-1], [0], "local ids out of range [0, 16): [-1]"),
        ([0, 1], [7, 8], "remote ids out of range [0, 8): [8]"),
        ([0, 1, 2], [3, 4, 3], "remote ids addressed twice: [3]"),
    ],
)
def test_validate_page_ids_refuses(local_ids: list[int], remote_ids: list[int], reason: str) -> None:
    with pytest.raises(InvalidPageIds) as info:
        validate_page_ids("req-7", local_ids, remote_ids, num_local_pages=16, num_remote_pages=8)
    assert isinstance(info.value, ValueError)
    assert info.value.request_id == "req-7"
    assert reason in str(info.value)
    assert "req-7" in str(info.value)


def test_validate_page_ids_accepts_numpy_and_tensors() -> None:
    local, remote = validate_page_ids(
        "r", np.array([3, 4]), torch.tensor([0, 7]), num_local_pages=16, num_remote_pages=8
    )
    assert (local, remote) == ([3, 4], [0, 7])
    assert all(type(i) is int for i in local + remote)


@pytest.mark.parametrize(
    ("page_ids", "text"),
    [([], ""), ([4], "4"), ([0, 1, 2, 7, 9, 10], "0-2,7,9-10"), ([5, 4], "5,4")],
)
def test_format_page_ids(page_ids: list[int], text: str) -> None:
    assert format_page_ids(page_ids) == text


def test_format_page_ids_truncates() -> None:
    assert format_page_ids(list(range(0, 40, 2)), max_ranges=3) == "0,2,4,...(20 pages)"


def test_run_rows_address_pages_by_id() -> None:
    layout = PoolLayout("DRAM", address=1 << 20, device_id=0, bytes_per_page=4096, num_pages=64)
    runs = [(4, 0, 3), (9, 30, 1)]
    local = layout.run_rows(runs, side=0)
    remote = layout.run_rows(runs, side=1)
    assert local.dtype == np.uint64
    assert local.tolist() == [[(1 << 20) + 4 * 4096, 3 * 4096, 0], [(1 << 20) + 9 * 4096, 4096, 0]]
    assert remote.tolist() == [[1 << 20, 3 * 4096, 0], [(1 << 20) + 30 * 4096, 4096, 0]]


def _descriptor(**changes: object) -> WorkerDescriptor:
    geometry = PageGeometry(16, 30, 3, 64, torch.bfloat16)
    desc = WorkerDescriptor(
        worker_id="decode-0",
        protocol_version=TRANSFER_PROTOCOL_VERSION,
        model_fingerprint="smollm2-135m:abc",
        dtype="bfloat16",
        geometry=WorkerDescriptor.PageGeometry(
            page_size=16, num_layers=30, num_kv_heads=3, head_dim=64,
            bytes_per_page=geometry.bytes_per_page,
        ),
        num_pages=10,
        agent_metadata=b"md",
        mem_type="DRAM",
        pool_regions=[
            WorkerDescriptor.MemoryRegion(address=4096, num_bytes=10 * geometry.bytes_per_page)
        ],
    )
    for name, value in changes.items():
        if hasattr(desc.geometry, name) and name not in ("worker_id",):
            setattr(desc.geometry, name, value)
        else:
            setattr(desc, name, value)
    return desc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("protocol_version", TRANSFER_PROTOCOL_VERSION + 1),
        ("model_fingerprint", "tinyllama:def"),
        ("dtype", "float16"),
        ("page_size", 32),
        ("num_layers", 22),
        ("num_kv_heads", 4),
        ("head_dim", 128),
        ("bytes_per_page", 1),
    ],
)
def test_check_compatible_names_the_field(field: str, value: object) -> None:
    local = _descriptor(worker_id="prefill-0")
    remote = _descriptor(**{field: value})
    with pytest.raises(DescriptorMismatch) as info:
        check_compatible(local, remote)
    assert info.value.field == field
    assert info.value.remote == value
    assert field in str(info.value) and "decode-0" in str(info.value)


def test_check_compatible_accepts_equal_geometry_with_other_pool_size() -> None:
    check_compatible(_descriptor(worker_id="prefill-0"), _descriptor(num_pages=99))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"worker_id": ""}, "empty worker_id"),
        ({"mem_type": "HBM"}, "unknown mem_type"),
        ({"num_pages": 11}, "does not hold 11 pages"),
        ({"agent_metadata": b""}, "no NIXL agent metadata"),
    ],
)
def test_layout_from_descriptor_refuses_inconsistent(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidDescriptor, match=reason):
        layout_from_descriptor(_descriptor(**changes))


def test_layout_from_descriptor() -> None:
    layout = layout_from_descriptor(_descriptor())
    assert layout == PoolLayout("DRAM", 4096, 0, 16 * 23040, 10)


def test_latency_stats_percentiles_and_reservoir_bound() -> None:
    stats = LatencyStats()
    for i in range(1, 101):
        stats.record(i / 1000)
    assert stats.count == 100
    assert stats.mean_s == pytest.approx(0.0505)
    assert stats.percentile_s(50) in (0.050, 0.051)
    assert stats.percentile_s(99) == 0.099
    for _ in range(5000):
        stats.record(1.0)
    assert len(stats.samples) == 1024 and stats.count == 5100


def test_counters_record_transfer_per_descriptor_mean() -> None:
    counters = TransferCounters()
    counters.record_transfer(num_bytes=1000, num_descriptors=4, seconds=0.008)
    counters.record_transfer(num_bytes=500, num_descriptors=1, seconds=0.002)
    assert (counters.num_bytes, counters.num_transfers, counters.num_descriptors) == (1500, 2, 5)
    assert counters.transfer_latency.mean_s == pytest.approx(0.005)
    assert counters.descriptor_latency.mean_s == pytest.approx(0.010 / 5)
    assert counters.snapshot()["num_descriptors"] == 5
