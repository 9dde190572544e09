"""store_kv against its torch reference: exact, strided inputs, skipped slots."""

from __future__ import annotations

import pytest
import torch
from paged_kv_cases import make_pool

from splitserve.kernels.store_kv import ref_store_kv, store_kv


@pytest.mark.parametrize(
    "num_kv_heads,head_dim,page_size,dtype,slot_dtype",
    [(3, 64, 16, torch.float32, torch.int64), (8, 128, 5, torch.bfloat16, torch.int64),
     (1, 40, 16, torch.bfloat16, torch.int32)],
    ids=["hkv3-d64-fp32", "hkv8-d128-bf16-page5", "hkv1-d40-bf16-int32-slots"],
)
def test_store_kv_matches_reference(num_kv_heads, head_dim, page_size, dtype, slot_dtype, device):
    num_pages, num_tokens = 12, 37
    pool = make_pool(num_pages, 3, page_size, num_kv_heads, head_dim, dtype, device, seed=3)
    expected_pool = pool.clone()
    gen = torch.Generator().manual_seed(4)
    # k and v as strided slices of one fused projection output.
    kv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    k, v = kv[:, num_kv_heads:2 * num_kv_heads], kv[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_pages * page_size, generator=gen)[:num_tokens]
    slots[[0, 7, 36]] = -1  # padding tokens: not stored
    slots = slots.to(device=device, dtype=slot_dtype)

    store_kv(k, v, pool[:, 2], slots)
    ref_store_kv(k, v, expected_pool[:, 2], slots)
    assert torch.equal(pool, expected_pool)  # exact, and the other layers untouched

    written = slots[slots >= 0].long()
    stored_k = pool[:, 2, 0].reshape(-1, num_kv_heads, head_dim)[written]
    assert torch.equal(stored_k, k[(slots >= 0)])


def test_store_kv_with_no_tokens_is_a_no_op(device):
    pool = make_pool(2, 1, 4, 2, 16, torch.float32, device, seed=0)
    before = pool.clone()
    empty = torch.empty(0, 2, 16, device=device)
    store_kv(empty, empty, pool[:, 0], torch.empty(0, dtype=torch.int64, device=device))
    assert torch.equal(pool, before)
