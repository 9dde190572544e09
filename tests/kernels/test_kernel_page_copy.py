"""pack/unpack/copy of whole pages: bitwise against the torch references."""

from __future__ import annotations

import pytest
import torch
from paged_kv_cases import make_pool

from splitserve.kernels.page_copy import (
    copy_pages,
    pack_pages,
    ref_copy_pages,
    ref_pack_pages,
    ref_unpack_pages,
    unpack_pages,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize(
    "dtype,page_shape",
    [(torch.bfloat16, (3, 2, 16, 3, 64)), (torch.float32, (2, 2, 5, 1, 40)),
     (torch.float8_e4m3fn, (2, 2, 16, 2, 128))],
    ids=["bf16-smollm-like", "fp32-odd", "fp8"],
)
def test_pack_unpack_round_trip(dtype, page_shape, device):
    num_pages = 11
    pool = make_pool(num_pages, *page_shape[:1], *page_shape[2:], torch.float32, device, seed=5)
    pool = pool.to(dtype)
    pool.view(torch.uint8)[0, :4] = 0xFF  # NaN bit patterns must survive untouched
    page_ids = [7, 0, 3, 9]

    staging = pack_pages(pool, page_ids)
    assert staging.shape == (4, *page_shape) and staging.dtype == dtype
    assert torch.equal(_bits(staging), _bits(ref_pack_pages(pool, page_ids)))

    out = torch.zeros_like(staging)
    assert pack_pages(pool, torch.tensor(page_ids, device=device), out=out) is out
    assert torch.equal(_bits(out), _bits(staging))

    target = torch.zeros_like(pool)
    expected = torch.zeros_like(pool)
    unpack_pages(staging, target, [1, 2, 4, 10])
    ref_unpack_pages(staging, expected, [1, 2, 4, 10])
    assert torch.equal(_bits(target), _bits(expected))
    assert torch.equal(_bits(target[[1, 2, 4, 10]]), _bits(pool[page_ids]))


def test_copy_partially_filled_last_page(device):
    """The decode worker's fence step: copy a received last page into a page it owns."""
    pool = make_pool(6, 2, 16, 3, 64, torch.bfloat16, device, seed=6)
    expected = pool.clone()
    copy_pages(pool, [4], [1])
    ref_copy_pages(expected, [4], [1])
    assert torch.equal(pool, expected)
    assert torch.equal(pool[1], pool[4])
    copy_pages(pool, torch.tensor([0, 2]), torch.tensor([3, 5]))
    assert torch.equal(pool[[3, 5]], pool[[0, 2]])


def test_pack_of_no_pages(device):
    pool = make_pool(3, 1, 4, 1, 16, torch.float32, device, seed=0)
    assert pack_pages(pool, []).shape == (0, 1, 2, 4, 1, 16)
