"""Whole-page copies on the full pool: pack for transfer staging, unpack, copy.

A page of the pool `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`
is one dense block of `page_numel` elements, so these kernels move flat chunks of
pages and never look at the inner layout. Copies are bitwise (the tensors are
viewed as same-width integers), so any dtype, fp8 included, moves unchanged.
Copying the prompt's partially filled last page into an owned page (the fence
invariant) is `copy_pages(pool, [src], [dst])`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels._checks import (
    PageIds,
    as_page_ids,
    bits_view,
    check_pages_contiguous,
    check_same_device,
)
from splitserve.kernels.backend import cdiv
from splitserve.kernels.errors import KernelArgumentError

# 4096 elements per program: 8 KiB of bf16, 32 per thread at 4 warps; large enough
# for 16-byte vector accesses, small enough to keep many programs per page in flight.
_BLOCK_SIZE = 4096


@triton.jit
def _copy_pages_kernel(
    Src_ptr, Dst_ptr, SrcIds_ptr, DstIds_ptr,
    Src_stride_page, Dst_stride_page, page_numel,
    HAS_SRC_IDS: tl.constexpr, HAS_DST_IDS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    src_page = i
    dst_page = i
    if HAS_SRC_IDS:
        src_page = tl.load(SrcIds_ptr + i)
    if HAS_DST_IDS:
        dst_page = tl.load(DstIds_ptr + i)
    offs = chunk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < page_numel
    x = tl.load(Src_ptr + src_page * Src_stride_page + offs, mask=mask)
    tl.store(Dst_ptr + dst_page * Dst_stride_page + offs, x, mask=mask)


def _launch_copy(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor | None,
                 dst_ids: torch.Tensor | None, num_pages: int) -> None:
    if num_pages == 0:
        return
    page_numel = src[0].numel()
    dummy = torch.empty(1, dtype=torch.int64, device=src.device)
    _copy_pages_kernel[(num_pages, cdiv(page_numel, _BLOCK_SIZE))](
        bits_view(src), bits_view(dst),
        src_ids if src_ids is not None else dummy, dst_ids if dst_ids is not None else dummy,
        src.stride(0), dst.stride(0), page_numel,
        HAS_SRC_IDS=src_ids is not None, HAS_DST_IDS=dst_ids is not None, BLOCK_SIZE=_BLOCK_SIZE,
    )


def _check_same_page_format(src_name: str, src: torch.Tensor, dst_name: str,
                            dst: torch.Tensor) -> None:
    check_same_device([(src_name, src), (dst_name, dst)])
    if tuple(src.shape[1:]) != tuple(dst.shape[1:]) or src.dtype != dst.dtype:
        raise KernelArgumentError(
            dst_name, f"page format {tuple(dst.shape[1:])} {dst.dtype} differs from {src_name}'s "
            f"{tuple(src.shape[1:])} {src.dtype}"
        )
    check_pages_contiguous(src_name, src)
    check_pages_contiguous(dst_name, dst)


def pack_pages(pool: torch.Tensor, page_ids: PageIds,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather `pool[page_ids]` into a dense staging tensor `[n, *page_shape]`."""
    ids = as_page_ids("page_ids", page_ids, pool.shape[0], pool.device)
    if out is None:
        out = pool.new_empty((ids.shape[0], *pool.shape[1:]))
    elif out.shape[0] != ids.shape[0]:
        raise KernelArgumentError("out", f"has {out.shape[0]} pages for {ids.shape[0]} page ids")
    _check_same_page_format("pool", pool, "out", out)
    _launch_copy(pool, out, ids, None, ids.shape[0])
    return out


def unpack_pages(staging: torch.Tensor, pool: torch.Tensor, page_ids: PageIds) -> None:
    """Scatter `staging[i]` into `pool[page_ids[i]]`, in place."""
    ids = as_page_ids("page_ids", page_ids, pool.shape[0], pool.device)
    if staging.shape[0] != ids.shape[0]:
        raise KernelArgumentError(
            "staging", f"has {staging.shape[0]} pages for {ids.shape[0]} page ids"
        )
    _check_same_page_format("staging", staging, "pool", pool)
    _launch_copy(staging, pool, None, ids, ids.shape[0])


def copy_pages(pool: torch.Tensor, src_page_ids: PageIds, dst_page_ids: PageIds) -> None:
    """`pool[dst_page_ids[i]] = pool[src_page_ids[i]]`; source and destination must not overlap."""
    src_ids = as_page_ids("src_page_ids", src_page_ids, pool.shape[0], pool.device)
    dst_ids = as_page_ids("dst_page_ids", dst_page_ids, pool.shape[0], pool.device)
    if src_ids.shape[0] != dst_ids.shape[0]:
        raise KernelArgumentError(
            "dst_page_ids", f"has {dst_ids.shape[0]} ids for {src_ids.shape[0]} source pages"
        )
    check_pages_contiguous("pool", pool)
    _launch_copy(pool, pool, src_ids, dst_ids, src_ids.shape[0])


def ref_pack_pages(pool: torch.Tensor, page_ids: PageIds,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    ids = torch.as_tensor(page_ids, dtype=torch.int64, device=pool.device)
    if out is None:
        return pool[ids].clone()
    out.copy_(pool[ids])
    return out


def ref_unpack_pages(staging: torch.Tensor, pool: torch.Tensor, page_ids: PageIds) -> None:
    pool[torch.as_tensor(page_ids, dtype=torch.int64, device=pool.device)] = staging


def ref_copy_pages(pool: torch.Tensor, src_page_ids: PageIds, dst_page_ids: PageIds) -> None:
    src = torch.as_tensor(src_page_ids, dtype=torch.int64, device=pool.device)
    dst = torch.as_tensor(dst_page_ids, dtype=torch.int64, device=pool.device)
    pool[dst] = pool[src]
