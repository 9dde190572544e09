"""Per-page xxh3-64 checksums over page-major KV pools (transfer/checksum.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from splitserve.engine.kv_pool import KVPool, PageGeometry
from splitserve.transfer.checksum import (
    ChecksumCountMismatch,
    page_checksums,
    verify_page_checksums,
)
from splitserve.transfer.errors import TransferError

# (page_size, num_layers, num_kv_heads, head_dim): odd sizes so no page is a power of
# two bytes long, and a single-token page.
GEOMETRIES = [(5, 3, 2, 7), (16, 2, 3, 64), (1, 1, 1, 3)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]
NUM_PAGES = 9


def _pool(geometry: tuple[int, int, int, int], dtype: torch.dtype, seed: int = 0) -> KVPool:
    """A `KVPool` (the real page-major allocator) filled with random bytes, NaN patterns
    included: the checksum must see bits, not values."""
    pool = KVPool(PageGeometry(*geometry, dtype), NUM_PAGES)
    raw = pool.tensor.view(torch.uint8)
    gen = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))
    return pool


def ref_checksum(page: torch.Tensor) -> int:
    """xxh3-64 over a copy of the page's bytes, made independently of the module."""
    return xxhash.xxh3_64_intdigest(page.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_checksums_equal_xxh3_of_page_bytes(
    geometry: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    pool = _pool(geometry, dtype)
    page_ids = [4, 0, 8, 4, 1]  # unordered, with a repeat
    sums = page_checksums(pool.tensor, page_ids)
    assert sums == [ref_checksum(pool.tensor[p]) for p in page_ids]
    assert sums[0] == sums[3]
    assert all(type(s) is int and 0 <= s < 2**64 for s in sums)


def test_checksum_is_a_pure_function_of_the_bytes() -> None:
    # The same bytes as bf16 and as int16 (or reshaped to another geometry with the
    # same page size in bytes) give the same checksum.
    pool = _pool((5, 3, 2, 8), torch.bfloat16)
    as_int16 = pool.tensor.view(torch.int16)
    regrouped = pool.tensor.view(NUM_PAGES, 3, 2, 5, 16, 1)
    expected = page_checksums(pool.tensor, range(NUM_PAGES))
    assert page_checksums(as_int16, range(NUM_PAGES)) == expected
    assert page_checksums(regrouped, range(NUM_PAGES)) == expected
    # A known value: a zeroed 4-byte page, computed here from literal bytes.
    assert page_checksums(torch.zeros(2, 1, dtype=torch.float32), [1]) == [
        xxhash.xxh3_64_intdigest(b"\0\0\0\0")
    ]


def test_cpu_pool_is_hashed_in_place() -> None:
    pool = _pool((5, 3, 2, 7), torch.bfloat16)
    before = page_checksums(pool.tensor, [2])
    pool.tensor[2].view(torch.uint8).view(-1)[0] ^= 1
    # No cached copy: the next call sees the write.
    assert page_checksums(pool.tensor, [2]) != before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_any_flipped_byte_is_detected_and_only_in_its_page(
    geometry: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    pool = _pool(geometry, dtype, seed=3)
    page_ids = [7, 2, 5, 3]
    expected = page_checksums(pool.tensor, page_ids)
    assert verify_page_checksums(pool.tensor, page_ids, expected) == []
    page_bytes = pool.tensor[0].view(torch.uint8).numel()
    rng = np.random.default_rng(11)
    # first byte, last byte, and a spread of bytes in between, in every page position
    offsets = sorted({0, page_bytes - 1, *rng.integers(0, page_bytes, 6).tolist()})
    for position, page_id in enumerate(page_ids):
        flat = pool.tensor[page_id].view(torch.uint8).view(-1)
        for offset in offsets:
            for bit in (0x01, 0x80):
                flat[offset] ^= bit
                assert verify_page_checksums(pool.tensor, page_ids, expected) == [position]
                flat[offset] ^= bit
    assert verify_page_checksums(pool.tensor, page_ids, expected) == []


def test_pages_outside_the_list_do_not_matter() -> None:
    pool = _pool((5, 3, 2, 7), torch.float32)
    expected = page_checksums(pool.tensor, [1, 2])
    pool.tensor[0].fill_(1.0)
    pool.tensor[3:].fill_(2.0)
    assert verify_page_checksums(pool.tensor, [1, 2], expected) == []


def test_verify_reports_every_mismatching_position() -> None:
    pool = _pool((5, 3, 2, 7), torch.bfloat16)
    page_ids = [0, 1, 2, 3]
    expected = page_checksums(pool.tensor, page_ids)
    wrong = [expected[0], expected[1] ^ 1, expected[2], expected[0]]
    assert verify_page_checksums(pool.tensor, page_ids, wrong) == [1, 3]
    # protobuf repeated fields and numpy arrays are accepted as `expected`
    assert verify_page_checksums(pool.tensor, page_ids, np.array(expected, dtype=np.uint64)) == []


@pytest.mark.parametrize(("num_pages", "num_checksums"), [(3, 2), (2, 3), (0, 1), (1, 0)])
def test_length_mismatch_is_a_typed_failure(num_pages: int, num_checksums: int) -> None:
    pool = _pool((5, 3, 2, 7), torch.float32)
    page_ids = list(range(num_pages))
    expected = page_checksums(pool.tensor, range(num_checksums))
    with pytest.raises(ChecksumCountMismatch) as info:
        verify_page_checksums(pool.tensor, page_ids, expected)
    assert (info.value.num_pages, info.value.num_checksums) == (num_pages, num_checksums)
    assert isinstance(info.value, TransferError)
    assert f"{num_checksums} checksums for {num_pages} pages" in str(info.value)


def test_empty_page_list() -> None:
    pool = _pool((5, 3, 2, 7), torch.float32)
    assert page_checksums(pool.tensor, []) == []
    assert verify_page_checksums(pool.tensor, [], []) == []


@pytest.mark.parametrize("bad_id", [-1, NUM_PAGES, 10**6])
def test_page_id_outside_the_pool_is_refused(bad_id: int) -> None:
    pool = _pool((5, 3, 2, 7), torch.float32)
    with pytest.raises(IndexError, match=f"outside the pool of {NUM_PAGES} pages"):
        page_checksums(pool.tensor, [0, bad_id])


def test_page_ids_as_numpy_and_tensor() -> None:
    pool = _pool((5, 3, 2, 7), torch.bfloat16)
    expected = page_checksums(pool.tensor, [3, 6])
    assert page_checksums(pool.tensor, np.array([3, 6])) == expected
    assert page_checksums(pool.tensor, torch.tensor([3, 6])) == expected
    with pytest.raises(TypeError):
        page_checksums(pool.tensor, [1.0])


def test_strided_pool_view_is_hashed_by_value() -> None:
    # Not how a KVPool looks, but the copy path (used for GPU pools) must agree with
    # the in-place one: every other page of a larger tensor.
    pool = _pool((5, 3, 2, 7), torch.bfloat16)
    strided = pool.tensor[::2]
    assert not strided.is_contiguous()
    assert page_checksums(strided, [0, 3, 4]) == page_checksums(pool.tensor, [0, 6, 8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pool_matches_its_host_copy() -> None:
    pool = _pool((5, 3, 2, 7), torch.bfloat16)
    on_device = pool.tensor.to("cuda")
    assert page_checksums(on_device, [8, 1, 1]) == page_checksums(pool.tensor, [8, 1, 1])
