"""Write new tokens' K and V into their pages by slot.

Layouts:
    k, v          [T, num_kv_heads, head_dim]  (any strides), dtype of the pool
    kv_layer      [num_pages, 2, page_size, num_kv_heads, head_dim]  (any strides)
    slot_mapping  int64 (or int32) [T], slot = page_id * page_size + offset; < 0 skips
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels._checks import (
    check_dtype,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
)
from splitserve.kernels.backend import next_power_of_2
from splitserve.kernels.errors import KernelArgumentError


@triton.jit
def _store_kv_kernel(
    K_ptr, V_ptr, KV_ptr, SlotMapping_ptr,
    K_stride_t, K_stride_h, K_stride_d,
    V_stride_t, V_stride_h, V_stride_d,
    KV_stride_page, KV_stride_kv, KV_stride_tok, KV_stride_head, KV_stride_d,
    page_size, num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SlotMapping_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    num_heads_written = tl.where(slot >= 0, num_kv_heads, 0)  # negative slot: skip the token
    mask = (h[:, None] < num_heads_written) & (d[None, :] < head_dim)
    page_id = slot // page_size
    dst = (KV_ptr + page_id * KV_stride_page + (slot % page_size) * KV_stride_tok
           + h[:, None] * KV_stride_head + d[None, :] * KV_stride_d)
    k = tl.load(K_ptr + token * K_stride_t + h[:, None] * K_stride_h + d[None, :] * K_stride_d,
                mask=mask)
    v = tl.load(V_ptr + token * V_stride_t + h[:, None] * V_stride_h + d[None, :] * V_stride_d,
                mask=mask)
    tl.store(dst, k, mask=mask)
    tl.store(dst + KV_stride_kv, v, mask=mask)


def _check_store_kv_args(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                         slot_mapping: torch.Tensor) -> None:
    check_ndim("k", k, 3, "[T, num_kv_heads, head_dim]")
    check_ndim("v", v, 3, "[T, num_kv_heads, head_dim]")
    check_ndim("kv_layer", kv_layer, 5, "[num_pages, 2, page_size, num_kv_heads, head_dim]")
    check_ndim("slot_mapping", slot_mapping, 1, "[T]")
    check_dtype("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    check_same_device([("kv_layer", kv_layer), ("k", k), ("v", v), ("slot_mapping", slot_mapping)])
    check_last_dim_contiguous("kv_layer", kv_layer)
    if kv_layer.shape[1] != 2:
        raise KernelArgumentError("kv_layer", f"axis 1 must be 2 (K, V), got {kv_layer.shape[1]}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != kv_layer.dtype:
            # Copies are bitwise; a silent cast would hide a model/pool dtype mismatch.
            raise KernelArgumentError(
                name, f"dtype {t.dtype} differs from kv_layer's {kv_layer.dtype}")
        if tuple(t.shape[1:]) != tuple(kv_layer.shape[3:]):
            raise KernelArgumentError(
                name, f"per-token shape {tuple(t.shape[1:])} differs from the pool's "
                f"(num_kv_heads, head_dim) {tuple(kv_layer.shape[3:])}"
            )
    if not (k.shape[0] == v.shape[0] == slot_mapping.shape[0]):
        raise KernelArgumentError(
            "slot_mapping", f"k, v and slot_mapping disagree on T: {k.shape[0]}, {v.shape[0]}, "
            f"{slot_mapping.shape[0]}"
        )


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Copy `k[t]`, `v[t]` into `kv_layer` at `slot_mapping[t]`, in place."""
    _check_store_kv_args(k, v, kv_layer, slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = kv_layer.shape[3], kv_layer.shape[4]
    _store_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping,
        *k.stride(), *v.stride(), *kv_layer.stride(),
        kv_layer.shape[2], num_kv_heads, head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_D=next_power_of_2(head_dim),
    )


def ref_store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Plain-torch reference of `store_kv`, in place."""
    page_size = kv_layer.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    page_ids, offsets = slots // page_size, slots % page_size
    kv_layer[page_ids, 0, offsets] = k[keep]
    kv_layer[page_ids, 1, offsets] = v[keep]
