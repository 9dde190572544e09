"""Re-bucket one sequence's KV from pages of one size into pages of another.

Used on the receiving side when the sender's page size differs from ours (e.g. a
prefill worker with 64-token pages feeding a decode worker with 16-token pages).
Token t lives at (src_page_ids[t // src_page_size], t % src_page_size) and goes to
(dst_page_ids[t // dst_page_size], t % dst_page_size), for every layer and K/V.
Slots past `num_tokens` in the last destination page are left untouched.

Both tensors are page-contiguous `[n, num_layers, 2, page_size, num_kv_heads, head_dim]`
(a pool or a staging buffer) of the same dtype; only `page_size` may differ, and one
page size must divide the other, so a destination page is always made of whole
source pages or a whole fraction of one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels._checks import (
    PageIds,
    as_page_ids,
    bits_view,
    check_page_tensor,
    check_same_device,
)
from splitserve.kernels.backend import cdiv, next_power_of_2
from splitserve.kernels.errors import KernelArgumentError

_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _resize_pages_kernel(
    Src_ptr, Dst_ptr, SrcIds_ptr, DstIds_ptr,
    Src_stride_page, Src_stride_slab, Src_stride_tok,
    Dst_stride_page, Dst_stride_slab, Dst_stride_tok,
    num_tokens, src_page_size, dst_page_size, row_numel,
    BLOCK_T: tl.constexpr, BLOCK_ROW: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slab = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 for K, 1 for V)
    t_mask = tokens < num_tokens
    src_page = tl.load(SrcIds_ptr + tokens // src_page_size, mask=t_mask, other=0)
    dst_page = tl.load(DstIds_ptr + tokens // dst_page_size, mask=t_mask, other=0)
    src_rows = (src_page * Src_stride_page + slab * Src_stride_slab
                + (tokens % src_page_size) * Src_stride_tok)
    dst_rows = (dst_page * Dst_stride_page + slab * Dst_stride_slab
                + (tokens % dst_page_size) * Dst_stride_tok)
    c = tl.arange(0, BLOCK_ROW)
    mask = t_mask[:, None] & (c[None, :] < row_numel)
    x = tl.load(Src_ptr + src_rows[:, None] + c[None, :], mask=mask)
    tl.store(Dst_ptr + dst_rows[:, None] + c[None, :], x, mask=mask)


def _check_resize_args(src: torch.Tensor, dst: torch.Tensor, num_tokens: int,
                       num_src_ids: int, num_dst_ids: int) -> None:
    check_page_tensor("src", src)
    check_page_tensor("dst", dst)
    check_same_device([("src", src), ("dst", dst)])
    if src.dtype != dst.dtype:
        raise KernelArgumentError(
            "dst", f"dtype {dst.dtype} differs from src's {src.dtype}; convert_pages_dtype first"
        )
    for axis, what in ((1, "num_layers"), (4, "num_kv_heads"), (5, "head_dim")):
        if src.shape[axis] != dst.shape[axis]:
            raise KernelArgumentError(
                f"dst.{what}", f"{dst.shape[axis]} differs from src's {src.shape[axis]}"
            )
    src_page_size, dst_page_size = src.shape[3], dst.shape[3]
    small, large = sorted((src_page_size, dst_page_size))
    if large % small != 0:
        raise KernelArgumentError(
            "dst.page_size", f"page sizes {src_page_size} (src) and {dst_page_size} (dst) "
            "do not divide each other"
        )
    if num_tokens < 0:
        raise KernelArgumentError("num_tokens", f"must be >= 0, got {num_tokens}")
    for name, num_ids, page_size in (("src_page_ids", num_src_ids, src_page_size),
                                     ("dst_page_ids", num_dst_ids, dst_page_size)):
        if num_ids * page_size < num_tokens:
            raise KernelArgumentError(
                name, f"too few pages: {num_ids} pages of {page_size} tokens hold "
                f"{num_ids * page_size} tokens, {num_tokens} need {cdiv(num_tokens, page_size)}"
            )


def resize_pages(src: torch.Tensor, src_page_ids: PageIds, num_tokens: int,
                 dst: torch.Tensor, dst_page_ids: PageIds) -> None:
    """Copy `num_tokens` tokens of one sequence from `src` pages into `dst` pages, in place."""
    src_ids = as_page_ids("src_page_ids", src_page_ids, src.shape[0], src.device)
    dst_ids = as_page_ids("dst_page_ids", dst_page_ids, dst.shape[0], dst.device)
    _check_resize_args(src, dst, num_tokens, src_ids.shape[0], dst_ids.shape[0])
    if num_tokens == 0:
        return
    num_layers, page_size_src, page_size_dst = src.shape[1], src.shape[3], dst.shape[3]
    row_numel = src.shape[4] * src.shape[5]
    block_row = next_power_of_2(row_numel)
    block_t = max(1, _ELEMENTS_PER_PROGRAM // block_row)
    _resize_pages_kernel[(cdiv(num_tokens, block_t), num_layers * 2)](
        bits_view(src), bits_view(dst), src_ids, dst_ids,
        src.stride(0), page_size_src * row_numel, row_numel,
        dst.stride(0), page_size_dst * row_numel, row_numel,
        num_tokens, page_size_src, page_size_dst, row_numel,
        BLOCK_T=block_t, BLOCK_ROW=block_row,
    )


def ref_resize_pages(src: torch.Tensor, src_page_ids: PageIds, num_tokens: int,
                     dst: torch.Tensor, dst_page_ids: PageIds) -> None:
    """Plain-torch reference of `resize_pages`, in place."""
    src_ids = torch.as_tensor(src_page_ids, dtype=torch.int64, device=src.device)
    dst_ids = torch.as_tensor(dst_page_ids, dtype=torch.int64, device=dst.device)
    tokens = torch.arange(num_tokens, device=src.device)
    src_size, dst_size = src.shape[3], dst.shape[3]
    # [L, 2, T, H, D], token-major after the per-token gather.
    values = src[src_ids[tokens // src_size], :, :, tokens % src_size]
    dst[dst_ids[tokens // dst_size], :, :, tokens % dst_size] = values
