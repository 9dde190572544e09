"""Paged varlen prefill attention against its torch reference, and the reference
against dense causal SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from paged_kv_cases import TOLERANCES, assign_pages, gather_kv, make_pool, poison

from splitserve.kernels.prefill_attention import (
    paged_prefill_attention,
    ref_paged_prefill_attention,
)

# (query_lens, seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, num_shared_pages)
# seq_len > query_len means cached context before the chunk (chunked prefill or a
# prefix-cache hit); query_len 0 is a sequence with nothing to compute this step.
_Q33 = [1, 0, 9, 40, 2] + [1 + (5 * i) % 23 for i in range(28)]
_S33 = [1, 12, 9, 100, 50] + [q + (7 * i) % 31 for i, q in enumerate(_Q33[5:])]
CASES = {
    "b1-gqa1-d64-fp32-fresh": ([37], [37], 4, 4, 64, 16, torch.float32, 0),
    "b1-gqa8-d128-bf16-chunk-after-context": ([70], [150], 8, 1, 128, 16, torch.bfloat16, 0),
    "b3-gqa3-d64-bf16-mixed": ([5, 70, 1], [5, 100, 40], 6, 2, 64, 16, torch.bfloat16, 0),
    "b33-gqa3-d128-fp32-page5": (_Q33, _S33, 3, 1, 128, 5, torch.float32, 0),
    "b2-gqa8-d64-fp32-prefix-hit": ([20, 33], [84, 97], 8, 1, 64, 16, torch.float32, 4),
    "b1-gqa3-d64-bf16-long-context": ([100], [1000], 3, 1, 64, 64, torch.bfloat16, 0),
    "b2-gqa1-d40-fp32-odd": ([13, 66], [13, 66], 2, 2, 40, 7, torch.float32, 1),
}


def _build(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype,
           num_shared, device, seed=0):
    num_pages = sum(math.ceil(n / page_size) for n in seq_lens) + 4
    pool = make_pool(num_pages, 2, page_size, num_kv_heads, head_dim, dtype, device, seed)
    kv_layer = pool[:, 1]
    page_tables = assign_pages(seq_lens, page_size, num_pages, seed, num_shared).to(device)
    poison(kv_layer, page_tables, seq_lens)
    gen = torch.Generator().manual_seed(seed + 1)
    qkv = torch.randn(sum(query_lens), num_heads + 2 * num_kv_heads, head_dim, generator=gen)
    q = qkv.to(device=device, dtype=dtype)[:, :num_heads]
    cu = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, kv_layer, cu, lens, page_tables


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_prefill_matches_reference(case, device):
    query_lens, seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, shared = CASES[case]
    q, kv_layer, cu, lens, page_tables = _build(
        query_lens, seq_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, shared, device)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, kv_layer, cu, lens, page_tables, scale)
    expected = ref_paged_prefill_attention(q, kv_layer, cu, lens, page_tables, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_prefill_accepts_int64_metadata(device):
    q, kv_layer, cu, lens, page_tables = _build(
        [9, 30], [20, 30], 4, 2, 64, 16, torch.float32, 0, device)
    out32 = paged_prefill_attention(q, kv_layer, cu, lens, page_tables, 0.125)
    out64 = paged_prefill_attention(q, kv_layer, cu.long(), lens.long(), page_tables.long(), 0.125)
    torch.testing.assert_close(out64, out32, atol=0, rtol=0)


def test_prefill_last_token_equals_decode(device):
    """The last query token of a chunk sees exactly what a decode step would."""
    from splitserve.kernels.decode_attention import paged_decode_attention

    q, kv_layer, cu, lens, page_tables = _build(
        [17, 40], [60, 40], 6, 2, 64, 16, torch.float32, 0, device)
    out = paged_prefill_attention(q, kv_layer, cu, lens, page_tables, 0.125)
    last_rows = (cu[1:] - 1).long()
    decode = paged_decode_attention(q[last_rows], kv_layer, page_tables, lens, 0.125, num_splits=2)
    torch.testing.assert_close(out[last_rows], decode, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("num_heads,num_kv_heads,page_size", [(8, 8, 16), (9, 3, 5)])
def test_reference_matches_dense_causal_sdpa(num_heads, num_kv_heads, page_size):
    query_lens, seq_lens = [12, 30, 1], [12, 75, 9]
    q, kv_layer, cu, lens, page_tables = _build(
        query_lens, seq_lens, num_heads, num_kv_heads, 64, page_size, torch.float32, 0,
        torch.device("cpu"))
    out = ref_paged_prefill_attention(q, kv_layer, cu, lens, page_tables, 0.125)
    for seq, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        k, v = gather_kv(kv_layer, page_tables, seq, seq_len)
        rows = slice(int(cu[seq]), int(cu[seq + 1]))
        # Query i sits at position seq_len - q_len + i: a causal mask shifted right.
        mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
        dense = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            scale=0.125, enable_gqa=True,
        ).transpose(0, 1)
        torch.testing.assert_close(out[rows], dense, atol=1e-5, rtol=1e-5)
