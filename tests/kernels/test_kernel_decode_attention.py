"""Paged decode attention (split-KV) against its torch reference, and the reference
against dense SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from paged_kv_cases import TOLERANCES, assign_pages, gather_kv, make_pool, poison

from splitserve.kernels.decode_attention import (
    MAX_NUM_SPLITS,
    default_num_splits,
    paged_decode_attention,
    ref_paged_decode_attention,
)

# (seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, num_splits, num_shared_pages)
# Covering combinations rather than a product: GQA 1/3/8, head_dim 64/128 (+ odd 40),
# fp32/bf16, batch 1/33 (with a zero-length padding row), one split, many splits,
# more splits than a short sequence has tiles, odd page size, shared prefix pages.
_BATCH_33 = [1, 0, 16, 17, 63, 64, 65, 5] + [3 + 7 * i for i in range(25)]
CASES = {
    "b1-gqa1-d64-fp32-one-token": ([1], 4, 4, 64, 16, torch.float32, None, 0),
    "b1-gqa8-d128-bf16-7splits": ([300], 8, 1, 128, 16, torch.bfloat16, 7, 0),
    "b1-gqa3-d64-fp32-auto-splits": ([700], 6, 2, 64, 64, torch.float32, None, 0),
    "b1-gqa8-d128-fp32-long-auto-splits": ([2011], 8, 1, 128, 16, torch.float32, None, 0),
    "b33-gqa3-d64-fp32-page5-1split": (_BATCH_33, 3, 1, 64, 5, torch.float32, 1, 0),
    "b33-gqa8-d128-bf16-3splits": (_BATCH_33, 8, 1, 128, 16, torch.bfloat16, 3, 0),
    "b3-gqa1-d40-fp32-empty-splits": ([2, 1, 150], 2, 2, 40, 16, torch.float32, 8, 0),
    "b2-gqa8-d64-bf16-shared-prefix": ([130, 97], 8, 1, 64, 16, torch.bfloat16, 4, 6),
}


def _run_case(seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, num_shared,
              device, seed=0):
    num_pages = sum(math.ceil(n / page_size) for n in seq_lens) + 4
    pool = make_pool(num_pages, 3, page_size, num_kv_heads, head_dim, dtype, device, seed)
    kv_layer = pool[:, 1]  # strided per-layer view, as the engine passes it
    page_tables = assign_pages(seq_lens, page_size, num_pages, seed, num_shared).to(device)
    poison(kv_layer, page_tables, seq_lens)
    gen = torch.Generator().manual_seed(seed + 1)
    # q as a strided slice of a fused projection output, like the model produces.
    qkv = torch.randn(len(seq_lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q = qkv.to(device=device, dtype=dtype)[:, :num_heads]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, kv_layer, page_tables, lens


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_decode_matches_reference(case, device):
    seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, num_splits, shared = CASES[case]
    q, kv_layer, page_tables, lens = _run_case(
        seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, shared, device)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, kv_layer, page_tables, lens, scale, num_splits=num_splits)
    expected = ref_paged_decode_attention(q, kv_layer, page_tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_decode_split_count_does_not_change_result(device):
    q, kv_layer, page_tables, lens = _run_case([200, 45], 6, 2, 64, 16, torch.float32, 0, device)
    one = paged_decode_attention(q, kv_layer, page_tables, lens, 0.125, num_splits=1)
    for num_splits in (2, 5):
        many = paged_decode_attention(q, kv_layer, page_tables, lens, 0.125, num_splits=num_splits)
        torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_default_num_splits_fills_the_device():
    cuda_like = torch.device("cpu")  # 4 compute units on CPU: 8 programs wanted
    assert default_num_splits(1, 1, 32768, cuda_like) == 8
    assert default_num_splits(1, 1, 600, cuda_like) == 2  # capped by 256 tokens per split
    assert default_num_splits(1, 8, 32768, cuda_like) == 1
    assert default_num_splits(128, 8, 32768, cuda_like) == 1
    assert default_num_splits(1, 1, 16, cuda_like) == 1
    assert 1 <= default_num_splits(1, 1, 10**7, cuda_like) <= MAX_NUM_SPLITS


@pytest.mark.parametrize("num_heads,num_kv_heads,page_size", [(8, 2, 16), (9, 3, 7)])
def test_reference_matches_dense_sdpa(num_heads, num_kv_heads, page_size):
    seq_lens = [33, 70, 1]
    q, kv_layer, page_tables, lens = _run_case(
        seq_lens, num_heads, num_kv_heads, 64, page_size, torch.float32, 0, torch.device("cpu"))
    out = ref_paged_decode_attention(q, kv_layer, page_tables, lens, 0.125)
    for seq, seq_len in enumerate(seq_lens):
        k, v = gather_kv(kv_layer, page_tables, seq, seq_len)
        dense = F.scaled_dot_product_attention(
            q[seq].unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=0.125,
            enable_gqa=True,
        ).squeeze(1)
        torch.testing.assert_close(out[seq], dense, atol=1e-5, rtol=1e-5)
