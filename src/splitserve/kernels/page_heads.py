"""Split a page's KV heads into tensor-parallel shards, and merge shards back.

Used on the receiving side when sender and receiver run different tensor-parallel
degrees: rank r of a degree-`num_shards` worker holds KV heads
`[r * h, (r + 1) * h)` with `h = num_kv_heads // num_shards`.

Operates on staging tensors `[n, num_layers, 2, page_size, num_kv_heads, head_dim]`
(from `pack_pages` or a transfer); `unpack_pages` puts the result into a pool.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from splitserve.kernels._checks import bits_view, check_page_tensor, check_same_device
from splitserve.kernels.backend import cdiv, next_power_of_2
from splitserve.kernels.errors import KernelArgumentError

_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _copy_rows_kernel(
    Src_ptr, Dst_ptr, num_rows, row_numel, Src_stride_row, Dst_stride_row,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < num_rows) & (c[None, :] < row_numel)
    x = tl.load(Src_ptr + rows[:, None] * Src_stride_row + c[None, :], mask=mask)
    tl.store(Dst_ptr + rows[:, None] * Dst_stride_row + c[None, :], x, mask=mask)


def _copy_head_slice(src: torch.Tensor, dst: torch.Tensor) -> None:
    """`dst = src` for `[.., heads, head_dim]` views whose rows (all but the last 2 dims) are
    evenly strided and whose head slice is contiguous."""
    num_rows = src.shape[:-2].numel()
    row_numel = src.shape[-2] * src.shape[-1]
    if num_rows == 0:
        return
    block_c = next_power_of_2(row_numel)
    block_r = max(1, _ELEMENTS_PER_PROGRAM // block_c)
    _copy_rows_kernel[(cdiv(num_rows, block_r),)](
        bits_view(src), bits_view(dst), num_rows, row_numel, src.stride(-3), dst.stride(-3),
        BLOCK_R=block_r, BLOCK_C=block_c,
    )


def _check_contiguous(name: str, pages: torch.Tensor) -> None:
    # The kernel walks (page, layer, K/V, token) rows with one stride.
    if not pages.is_contiguous():
        raise KernelArgumentError(name, f"must be a contiguous staging tensor, got strides "
                                  f"{pages.stride()} for shape {tuple(pages.shape)}")


def split_page_heads(pages: torch.Tensor, num_shards: int) -> list[torch.Tensor]:
    """Split `[n, L, 2, P, H, D]` into `num_shards` tensors `[n, L, 2, P, H / num_shards, D]`."""
    check_page_tensor("pages", pages)
    _check_contiguous("pages", pages)
    num_kv_heads = pages.shape[4]
    if num_shards < 1:
        raise KernelArgumentError("num_shards", f"must be >= 1, got {num_shards}")
    if num_kv_heads % num_shards != 0:
        raise KernelArgumentError(
            "num_shards", f"num_kv_heads {num_kv_heads} is not divisible by {num_shards} shards"
        )
    heads_per_shard = num_kv_heads // num_shards
    shards = []
    for rank in range(num_shards):
        shard = pages.new_empty((*pages.shape[:4], heads_per_shard, pages.shape[5]))
        head_slice = pages[..., rank * heads_per_shard:(rank + 1) * heads_per_shard, :]
        _copy_head_slice(head_slice, shard)
        shards.append(shard)
    return shards


def merge_page_heads(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate shards `[n, L, 2, P, h, D]` (rank order) into `[n, L, 2, P, h * len, D]`."""
    if len(shards) == 0:
        raise KernelArgumentError("shards", "need at least one shard")
    first = shards[0]
    for rank, shard in enumerate(shards):
        check_page_tensor(f"shards[{rank}]", shard)
        _check_contiguous(f"shards[{rank}]", shard)
        if shard.shape != first.shape or shard.dtype != first.dtype:
            raise KernelArgumentError(
                f"shards[{rank}]", f"shape {tuple(shard.shape)} {shard.dtype} differs from "
                f"shards[0]'s {tuple(first.shape)} {first.dtype}"
            )
    check_same_device([(f"shards[{rank}]", s) for rank, s in enumerate(shards)])
    heads_per_shard = first.shape[4]
    merged = first.new_empty((*first.shape[:4], heads_per_shard * len(shards), first.shape[5]))
    for rank, shard in enumerate(shards):
        _copy_head_slice(shard, merged[..., rank * heads_per_shard:(rank + 1) * heads_per_shard, :])
    return merged


def ref_split_page_heads(pages: torch.Tensor, num_shards: int) -> list[torch.Tensor]:
    return [s.contiguous() for s in pages.chunk(num_shards, dim=4)]


def ref_merge_page_heads(shards: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(list(shards), dim=4)
