"""Paged decode attention with split-KV (flash-decoding).

One query token per sequence attends to that sequence's KV pages. The work for
one sequence and one KV head is cut into `num_splits` chunks of the context; each
program computes a partial softmax over its chunk for all query heads sharing the
KV head (GQA), and a second kernel merges the partials with their log-sum-exp.
A batch of 1 with 8 KV heads is only 8 programs without splitting, i.e. 6% of an
H100's 132 SMs; splitting a 32k context 33 ways fills them.

Layouts:
    q          [B, num_heads, head_dim]
    kv_layer   [num_pages, 2, page_size, num_kv_heads, head_dim]  (any strides)
    page_tables int32 (or int64) [B, max_pages_per_seq]
    seq_lens   int32 (or int64) [B], KV tokens per sequence incl. the current one
    out        [B, num_heads, head_dim], dtype of q
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from splitserve.kernels._attention_checks import check_paged_attention_args
from splitserve.kernels.backend import cdiv, dot_precision, next_power_of_2, num_compute_units
from splitserve.kernels.errors import KernelArgumentError

LOG2E = 1.4426950408889634

# A split shorter than this spends more time on its launch share and the merge
# than on reading KV; 256 tokens of one bf16 KV head with head_dim 128 is 128 KiB.
MIN_TOKENS_PER_SPLIT = 256
MAX_NUM_SPLITS = 64


@triton.jit
def _paged_decode_split_kernel(
    Q_ptr, KV_ptr, BlockTables_ptr, SeqLens_ptr, Out_ptr, Lse_ptr,
    qk_scale_log2,
    Q_stride_b, Q_stride_h, Q_stride_d,
    KV_stride_page, KV_stride_kv, KV_stride_tok, KV_stride_head, KV_stride_d,
    BT_stride_b, BT_stride_p,
    Out_stride_b, Out_stride_split, Out_stride_h, Out_stride_d,
    Lse_stride_b, Lse_stride_split, Lse_stride_h,
    num_splits, page_size, head_dim,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens_ptr + seq)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP_SIZE + g
    g_mask = g < GROUP_SIZE
    d_mask = d < head_dim
    q = tl.load(
        Q_ptr + seq * Q_stride_b + heads[:, None] * Q_stride_h + d[None, :] * Q_stride_d,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)
    q = q * qk_scale_log2  # scores come out in log2 units: exp2 instead of exp

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTables_ptr + seq * BT_stride_b
    head_offset = kv_head * KV_stride_head
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < end
        page_ids = tl.load(bt_row + (pos // page_size) * BT_stride_p, mask=pos_mask, other=0)
        tok_offsets = (page_ids.to(tl.int64) * KV_stride_page
                       + (pos % page_size) * KV_stride_tok + head_offset)
        kv_offsets = tok_offsets[:, None] + d[None, :] * KV_stride_d
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(KV_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        scores = tl.where(pos_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(KV_ptr + KV_stride_kv + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_tokens = l_i > 0.0  # an empty split (short sequence) contributes nothing
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    out_ptrs = (Out_ptr + seq * Out_stride_b + split * Out_stride_split
                + heads[:, None] * Out_stride_h + d[None, :] * Out_stride_d)
    tl.store(out_ptrs, out.to(Out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(Lse_ptr + seq * Lse_stride_b + split * Lse_stride_split + heads * Lse_stride_h,
                 lse, mask=g_mask)


@triton.jit
def _paged_decode_merge_kernel(
    Partial_ptr, Lse_ptr, Out_ptr,
    Partial_stride_b, Partial_stride_split, Partial_stride_h, Partial_stride_d,
    Lse_stride_b, Lse_stride_split, Lse_stride_h,
    Out_stride_b, Out_stride_h, Out_stride_d,
    num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < head_dim
    lse = tl.load(Lse_ptr + seq * Lse_stride_b + s * Lse_stride_split + head * Lse_stride_h,
                  mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0: all splits empty
    weights = tl.exp2(lse - lse_max)
    partial = tl.load(
        Partial_ptr + seq * Partial_stride_b + s[:, None] * Partial_stride_split
        + head * Partial_stride_h + d[None, :] * Partial_stride_d,
        mask=s_mask[:, None] & d_mask[None, :], other=0.0,
    )
    total = tl.sum(weights, 0)
    out = tl.sum(partial * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out_ptr + seq * Out_stride_b + head * Out_stride_h + d * Out_stride_d,
             out.to(Out_ptr.dtype.element_ty), mask=d_mask)


def default_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int,
                       device: torch.device) -> int:
    """Splits per sequence so that about two programs run per SM.

    Bounded by `MIN_TOKENS_PER_SPLIT` tokens per split and `MAX_NUM_SPLITS`.
    `max_context_len` is an upper bound known on the host (page table width times
    page size), so choosing never syncs with the device.
    """
    num_programs = batch_size * num_kv_heads
    target_programs = 2 * num_compute_units(device)
    if num_programs >= target_programs:
        return 1
    by_occupancy = cdiv(target_programs, num_programs)
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(by_occupancy, by_length, MAX_NUM_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV; returns `[B, H, D]`."""
    check_paged_attention_args(q, kv_layer, page_tables, seq_lens, query_ndim=3)
    if q.shape[0] != page_tables.shape[0]:
        raise KernelArgumentError(
            "page_tables", f"has {page_tables.shape[0]} rows for a batch of {q.shape[0]}"
        )
    batch_size, num_heads, head_dim = q.shape
    num_kv_heads, page_size = kv_layer.shape[3], kv_layer.shape[2]
    if num_splits is None:
        num_splits = default_num_splits(
            batch_size, num_kv_heads, page_tables.shape[1] * page_size, q.device
        )
    if num_splits < 1:
        raise KernelArgumentError("num_splits", f"must be >= 1, got {num_splits}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch_size == 0:
        return out

    group_size = num_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    block_n = 64 if block_d <= 64 else 32  # keeps the fp32 K/V tiles at 4k elements
    if num_splits == 1:
        # One split is the whole answer: write it straight to `out`, skip the merge.
        partial = out.unsqueeze(1)
        lse = out.new_empty((1, 1, 1), dtype=torch.float32)
    else:
        partial = q.new_empty((batch_size, num_splits, num_heads, head_dim), dtype=torch.float32)
        lse = q.new_empty((batch_size, num_splits, num_heads), dtype=torch.float32)

    _paged_decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q, kv_layer, page_tables, seq_lens, partial, lse,
        scale * LOG2E,
        *q.stride(), *kv_layer.stride(), *page_tables.stride(),
        *partial.stride(), *lse.stride(),
        num_splits, page_size, head_dim,
        GROUP_SIZE=group_size, BLOCK_G=max(16, next_power_of_2(group_size)),
        BLOCK_N=block_n, BLOCK_D=block_d, STORE_LSE=num_splits > 1,
        DOT_PRECISION=dot_precision(kv_layer.dtype),
    )
    if num_splits > 1:
        _paged_decode_merge_kernel[(batch_size, num_heads)](
            partial, lse, out,
            *partial.stride(), *lse.stride(), *out.stride(),
            num_splits, head_dim,
            BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


def ref_paged_decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain-torch reference: gather each sequence's KV, softmax in fp32.

    `num_splits` is accepted for signature parity and ignored.
    """
    del num_splits
    batch_size, num_heads, head_dim = q.shape
    page_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group_size = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for seq in range(batch_size):
        seq_len = int(seq_lens[seq])
        if seq_len == 0:
            continue
        num_pages = math.ceil(seq_len / page_size)
        pages = kv_layer[page_tables[seq, :num_pages].long()].float()  # [n, 2, P, Hkv, D]
        k = pages[:, 0].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = pages[:, 1].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.repeat_interleave(group_size, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group_size, dim=1)
        scores = torch.einsum("hd,shd->hs", q[seq].float(), k) * scale
        out[seq] = torch.einsum("hs,shd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
