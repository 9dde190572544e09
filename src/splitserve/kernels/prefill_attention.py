"""Paged prefill attention over a varlen batch (chunked prefill, prefix-cache hits).

Sequence b contributes `q_len_b = cu_query_lens[b+1] - cu_query_lens[b]` query
tokens whose K/V are already stored in its pages; its total KV length is
`seq_lens[b]`. Query token i of b sits at position `seq_lens[b] - q_len_b + i` and
attends causally to positions `0..that position`.

Layouts:
    q             [T, num_heads, head_dim], T = cu_query_lens[-1]
    kv_layer      [num_pages, 2, page_size, num_kv_heads, head_dim]  (any strides)
    cu_query_lens int32 (or int64) [B + 1]
    seq_lens      int32 (or int64) [B]
    page_tables  int32 (or int64) [B, max_pages_per_seq]
    out           [T, num_heads, head_dim], dtype of q

The grid is sized without reading the lengths back to the host: query tile j of
sequence b gets program `cu_query_lens[b] // BLOCK_M + b + j`, which never collides
with the next sequence's first tile, so `T // BLOCK_M + B` programs cover every
tile and each program finds its sequence by binary search.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from splitserve.kernels._attention_checks import INDEX_DTYPES, check_paged_attention_args
from splitserve.kernels._checks import check_dtype, check_ndim, check_same_device
from splitserve.kernels.backend import dot_precision, interpreter_enabled, next_power_of_2
from splitserve.kernels.errors import KernelArgumentError

LOG2E = 1.4426950408889634


@triton.jit
def _paged_prefill_kernel(
    Q_ptr, KV_ptr, CuQueryLens_ptr, SeqLens_ptr, BlockTables_ptr, Out_ptr,
    qk_scale_log2,
    Q_stride_t, Q_stride_h, Q_stride_d,
    KV_stride_page, KV_stride_kv, KV_stride_tok, KV_stride_head, KV_stride_d,
    BT_stride_b, BT_stride_p,
    Out_stride_t, Out_stride_h, Out_stride_d,
    num_seqs, page_size, head_dim,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP_SIZE

    # Largest sequence whose first tile id is <= pid. Annotated so the loop-carried
    # bounds are int32 from the start even when num_seqs == 1 is specialized to a constant.
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(CuQueryLens_ptr + mid) // BLOCK_M + mid <= pid:
            lo = mid
        else:
            hi = mid
    seq = lo
    q_start = tl.load(CuQueryLens_ptr + seq)
    q_len = tl.load(CuQueryLens_ptr + seq + 1) - q_start
    tile = pid - (q_start // BLOCK_M + seq)
    seq_len = tl.load(SeqLens_ptr + seq)
    context_len = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = context_len + rows
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(
        Q_ptr + (q_start + rows)[:, None].to(tl.int64) * Q_stride_t + head * Q_stride_h
        + d[None, :] * Q_stride_d,
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # KV needed by this tile: positions up to its last valid query; none if the tile is empty.
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, q_len)
    kv_end = tl.where(tile * BLOCK_M < q_len, context_len + last_row, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BlockTables_ptr + seq * BT_stride_b
    head_offset = kv_head * KV_stride_head
    for kv_start in range(0, kv_end, BLOCK_N):
        pos = kv_start + tl.arange(0, BLOCK_N)
        pos_mask = pos < kv_end
        page_ids = tl.load(bt_row + (pos // page_size) * BT_stride_p, mask=pos_mask, other=0)
        tok_offsets = (page_ids.to(tl.int64) * KV_stride_page
                       + (pos % page_size) * KV_stride_tok + head_offset)
        kv_offsets = tok_offsets[:, None] + d[None, :] * KV_stride_d
        kv_mask = pos_mask[:, None] & d_mask[None, :]
        k = tl.load(KV_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        causal = (pos[None, :] <= q_pos[:, None]) & pos_mask[None, :]
        scores = tl.where(causal, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(KV_ptr + KV_stride_kv + kv_offsets, mask=kv_mask, other=0.0)
        if DOT_IN_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        Out_ptr + (q_start + rows)[:, None].to(tl.int64) * Out_stride_t + head * Out_stride_h
        + d[None, :] * Out_stride_d,
        out.to(Out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )


def paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    cu_query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a varlen batch of new tokens over paged KV; returns `[T, H, D]`."""
    check_paged_attention_args(q, kv_layer, page_tables, seq_lens, query_ndim=3)
    check_ndim("cu_query_lens", cu_query_lens, 1, "[num_seqs + 1]")
    check_dtype("cu_query_lens", cu_query_lens, INDEX_DTYPES)
    check_same_device([("q", q), ("cu_query_lens", cu_query_lens)])
    num_seqs = seq_lens.shape[0]
    if cu_query_lens.shape[0] != num_seqs + 1:
        raise KernelArgumentError(
            "cu_query_lens", f"has {cu_query_lens.shape[0]} entries for {num_seqs} sequences; "
            f"expected {num_seqs + 1}"
        )
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out

    num_kv_heads, page_size = kv_layer.shape[3], kv_layer.shape[2]
    block_d = max(16, next_power_of_2(head_dim))
    block_m = 64 if block_d <= 64 else 32
    # Tensor cores take bf16/fp16 directly (fp32 accumulation); the interpreter has no
    # bf16 arithmetic, so there everything is cast to fp32 (and tl.dot is exact fp32).
    dot_in_fp32 = interpreter_enabled() or q.dtype == torch.float32 or q.dtype != kv_layer.dtype
    _paged_prefill_kernel[(num_tokens // block_m + num_seqs, num_heads)](
        q, kv_layer, cu_query_lens, seq_lens, page_tables, out,
        scale * LOG2E,
        *q.stride(), *kv_layer.stride(), *page_tables.stride(), *out.stride(),
        num_seqs, page_size, head_dim,
        GROUP_SIZE=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=32,
        BLOCK_D=block_d, DOT_IN_FP32=dot_in_fp32,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out


def ref_paged_prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    cu_query_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference: gather each sequence's KV, causal softmax in fp32."""
    _, num_heads, head_dim = q.shape
    page_size, num_kv_heads = kv_layer.shape[2], kv_layer.shape[3]
    group_size = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    for seq in range(seq_lens.shape[0]):
        q_start, q_end = int(cu_query_lens[seq]), int(cu_query_lens[seq + 1])
        seq_len, q_len = int(seq_lens[seq]), q_end - q_start
        if q_len == 0:
            continue
        num_pages = math.ceil(seq_len / page_size)
        pages = kv_layer[page_tables[seq, :num_pages].long()].float()  # [n, 2, P, Hkv, D]
        k = pages[:, 0].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = pages[:, 1].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.repeat_interleave(group_size, dim=1)
        v = v.repeat_interleave(group_size, dim=1)
        scores = torch.einsum("thd,shd->hts", q[q_start:q_end].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        visible = torch.arange(seq_len, device=q.device).unsqueeze(0) <= q_pos  # [q_len, seq_len]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q_start:q_end] = torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)
    return out
