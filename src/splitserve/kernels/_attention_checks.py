"""Argument checks shared by the paged attention wrappers."""

from __future__ import annotations

import torch

from splitserve.kernels._checks import (
    check_dtype,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
)
from splitserve.kernels.errors import KernelArgumentError

ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# int32 is the documented layout; int64 (what torch indexing produces) is accepted too
# so callers need no conversion kernel per step.
INDEX_DTYPES = (torch.int32, torch.int64)


def check_paged_attention_args(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    page_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_ndim: int,
) -> None:
    """Validate shapes, dtypes and devices common to decode and prefill attention."""
    check_ndim("q", q, query_ndim, "[tokens, num_heads, head_dim]")
    check_ndim("kv_layer", kv_layer, 5, "[num_pages, 2, page_size, num_kv_heads, head_dim]")
    check_ndim("page_tables", page_tables, 2, "[num_seqs, max_pages_per_seq]")
    check_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    check_dtype("q", q, ATTENTION_DTYPES)
    check_dtype("kv_layer", kv_layer, ATTENTION_DTYPES)
    check_dtype("page_tables", page_tables, INDEX_DTYPES)
    check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
    check_same_device([("q", q), ("kv_layer", kv_layer), ("page_tables", page_tables),
                       ("seq_lens", seq_lens)])
    check_last_dim_contiguous("kv_layer", kv_layer)
    if kv_layer.shape[1] != 2:
        raise KernelArgumentError("kv_layer", f"axis 1 must be 2 (K, V), got {kv_layer.shape[1]}")
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = kv_layer.shape[3]
    if kv_layer.shape[4] != head_dim:
        raise KernelArgumentError(
            "kv_layer", f"head_dim {kv_layer.shape[4]} differs from q's head_dim {head_dim}"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise KernelArgumentError(
            "q", f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    if seq_lens.shape[0] != page_tables.shape[0]:
        raise KernelArgumentError(
            "seq_lens", f"has {seq_lens.shape[0]} entries but page_tables has "
            f"{page_tables.shape[0]} rows"
        )
