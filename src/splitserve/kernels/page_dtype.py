"""Convert KV pages between dtypes: fp32, bf16, fp16 and float8 e4m3 with scales.

fp8 pages carry one fp32 scale per (page, layer, K/V) in a tensor
`scales[num_pages, num_layers, 2]` indexed like the pages: a value is
`float(code) * scale`. Quantizing picks `scale = amax / 448` over the 16-token
slab (or 1 for an all-zero slab) so the slab's largest magnitude maps to e4m3's
largest finite value; e4m3 keeps 3 mantissa bits, i.e. a relative error of at most
2^-4 for normal values and an absolute one of `scale * 2^-10` for subnormals.

Pages move from `src[src_page_ids[i]]` to `dst[dst_page_ids[i]]` (ids default to
0..n-1), both page-contiguous `[n, num_layers, 2, page_size, num_kv_heads, head_dim]`
with equal page shapes. One program converts one (page, layer, K/V) slab.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels._checks import PageIds, as_page_ids, check_page_tensor, check_same_device
from splitserve.kernels._float_bits import (
    E4M3_MAX,
    e4m3_bits_to_fp32,
    fp32_to_bf16_bits,
    fp32_to_e4m3_bits,
)
from splitserve.kernels.errors import KernelArgumentError

# Storage formats as the kernel sees them.
_NATIVE, _BF16, _FP8 = 0, 1, 2
_FORMATS = {torch.float32: _NATIVE, torch.float16: _NATIVE, torch.bfloat16: _BF16,
            torch.float8_e4m3fn: _FP8}
_BLOCK_SIZE = 2048


@triton.jit
def _load_slab_chunk(Src_ptr, offs, mask, src_scale, SRC_FORMAT: tl.constexpr):
    if SRC_FORMAT == 2:
        x = e4m3_bits_to_fp32(tl.load(Src_ptr + offs, mask=mask, other=0)) * src_scale
    else:
        x = tl.load(Src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _convert_pages_kernel(
    Src_ptr, Dst_ptr, SrcIds_ptr, DstIds_ptr, SrcScales_ptr, DstScales_ptr,
    Src_stride_page, Dst_stride_page,
    SrcScales_stride_page, SrcScales_stride_layer, SrcScales_stride_kv,
    DstScales_stride_page, DstScales_stride_layer, DstScales_stride_kv,
    slab_numel,
    SRC_FORMAT: tl.constexpr, DST_FORMAT: tl.constexpr,
    HAS_SRC_IDS: tl.constexpr, HAS_DST_IDS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    slab = tl.program_id(1)
    layer = slab // 2
    kv = slab % 2
    src_page = i
    dst_page = i
    if HAS_SRC_IDS:
        src_page = tl.load(SrcIds_ptr + i)
    if HAS_DST_IDS:
        dst_page = tl.load(DstIds_ptr + i)
    src_base = Src_ptr + src_page * Src_stride_page + slab * slab_numel
    dst_base = Dst_ptr + dst_page * Dst_stride_page + slab * slab_numel

    src_scale = 1.0
    if SRC_FORMAT == 2:
        src_scale = tl.load(SrcScales_ptr + src_page * SrcScales_stride_page
                            + layer * SrcScales_stride_layer + kv * SrcScales_stride_kv)
    dst_scale = 1.0
    if DST_FORMAT == 2:
        amax: tl.float32 = 0.0  # an fp32 value, not a constant, carried through the loop
        for start in range(0, slab_numel, BLOCK_SIZE):
            offs = start + tl.arange(0, BLOCK_SIZE)
            x = _load_slab_chunk(src_base, offs, offs < slab_numel, src_scale, SRC_FORMAT)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 0))
        dst_scale = tl.where(amax > 0.0, tl.math.div_rn(amax, 448.0), 1.0)
        tl.store(DstScales_ptr + dst_page * DstScales_stride_page
                 + layer * DstScales_stride_layer + kv * DstScales_stride_kv, dst_scale)

    for start in range(0, slab_numel, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < slab_numel
        x = _load_slab_chunk(src_base, offs, mask, src_scale, SRC_FORMAT)
        if DST_FORMAT == 2:
            x = tl.clamp(tl.math.div_rn(x, dst_scale), -448.0, 448.0)
            tl.store(dst_base + offs, fp32_to_e4m3_bits(x), mask=mask)
        elif DST_FORMAT == 1:
            tl.store(dst_base + offs, fp32_to_bf16_bits(x), mask=mask)
        else:
            tl.store(dst_base + offs, x.to(dst_base.dtype.element_ty), mask=mask)


def _storage_view(t: torch.Tensor, is_dst: bool) -> torch.Tensor:
    """What the kernel addresses: fp8 as uint8 codes, a bf16 destination as int16 bits
    (written by `fp32_to_bf16_bits`); everything else as is (bf16 -> fp32 loads are exact)."""
    fmt = _FORMATS[t.dtype]
    if fmt == _FP8:
        return t.view(torch.uint8)
    if fmt == _BF16 and is_dst:
        return t.view(torch.int16)
    return t


def _check_scales(name: str, scales: torch.Tensor | None, pages: torch.Tensor) -> torch.Tensor:
    if scales is None:
        raise KernelArgumentError(name, "float8_e4m3fn pages need a scales tensor")
    expected = (pages.shape[0], pages.shape[1], 2)
    if tuple(scales.shape) != expected or scales.dtype != torch.float32:
        raise KernelArgumentError(
            name, f"expected float32 {expected} (pages, layers, K/V), got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    check_same_device([("pages", pages), (name, scales)])
    return scales


def _check_convert_args(src: torch.Tensor, dst: torch.Tensor) -> None:
    check_page_tensor("src", src)
    check_page_tensor("dst", dst)
    check_same_device([("src", src), ("dst", dst)])
    for name, t in (("src", src), ("dst", dst)):
        if t.dtype not in _FORMATS:
            raise KernelArgumentError(
                name, f"unknown KV dtype {t.dtype}; supported: float32, bfloat16, float16, "
                "float8_e4m3fn"
            )
    if src.dtype == dst.dtype == torch.float8_e4m3fn:
        raise KernelArgumentError(
            "dst", "float8_e4m3fn to float8_e4m3fn is not a conversion; copy the pages "
            "and their scales as they are"
        )
    if tuple(src.shape[1:]) != tuple(dst.shape[1:]):
        raise KernelArgumentError(
            "dst", f"page shape {tuple(dst.shape[1:])} differs from src's {tuple(src.shape[1:])}; "
            "convert dtype first, then resize_pages or split_page_heads"
        )


def convert_pages_dtype(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_page_ids: PageIds | None = None,
    dst_page_ids: PageIds | None = None,
    src_scales: torch.Tensor | None = None,
    dst_scales: torch.Tensor | None = None,
) -> None:
    """Convert pages `src[src_page_ids]` into `dst[dst_page_ids]`, in place.

    `src_scales` is read when `src` is float8_e4m3fn; `dst_scales` is written when
    `dst` is. Non-fp8 conversions round to nearest even, exactly like torch's `.to()`.
    """
    _check_convert_args(src, dst)
    src_ids = None if src_page_ids is None else as_page_ids(
        "src_page_ids", src_page_ids, src.shape[0], src.device)
    dst_ids = None if dst_page_ids is None else as_page_ids(
        "dst_page_ids", dst_page_ids, dst.shape[0], dst.device)
    num_src = src.shape[0] if src_ids is None else src_ids.shape[0]
    num_dst = dst.shape[0] if dst_ids is None else dst_ids.shape[0]
    if num_src != num_dst:
        raise KernelArgumentError(
            "dst_page_ids", f"{num_dst} destination pages for {num_src} source pages")
    src_fmt, dst_fmt = _FORMATS[src.dtype], _FORMATS[dst.dtype]
    dummy_scales = torch.empty((1, 1, 1), dtype=torch.float32, device=src.device)
    src_scales = _check_scales("src_scales", src_scales, src) if src_fmt == _FP8 else dummy_scales
    dst_scales = _check_scales("dst_scales", dst_scales, dst) if dst_fmt == _FP8 else dummy_scales
    if num_src == 0:
        return
    dummy_ids = torch.empty(1, dtype=torch.int64, device=src.device)
    num_layers = src.shape[1]
    _convert_pages_kernel[(num_src, num_layers * 2)](
        _storage_view(src, is_dst=False), _storage_view(dst, is_dst=True),
        src_ids if src_ids is not None else dummy_ids,
        dst_ids if dst_ids is not None else dummy_ids,
        src_scales, dst_scales,
        src.stride(0), dst.stride(0), *src_scales.stride(), *dst_scales.stride(),
        src[0, 0, 0].numel(),
        SRC_FORMAT=src_fmt, DST_FORMAT=dst_fmt,
        HAS_SRC_IDS=src_ids is not None, HAS_DST_IDS=dst_ids is not None, BLOCK_SIZE=_BLOCK_SIZE,
    )


def ref_convert_pages_dtype(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_page_ids: PageIds | None = None,
    dst_page_ids: PageIds | None = None,
    src_scales: torch.Tensor | None = None,
    dst_scales: torch.Tensor | None = None,
) -> None:
    """Plain-torch reference of `convert_pages_dtype`, in place."""
    src_ids = torch.arange(src.shape[0]) if src_page_ids is None else torch.as_tensor(src_page_ids)
    dst_ids = torch.arange(dst.shape[0]) if dst_page_ids is None else torch.as_tensor(dst_page_ids)
    src_ids, dst_ids = src_ids.long().to(src.device), dst_ids.long().to(dst.device)
    values = src[src_ids].float()  # [n, L, 2, P, H, D]
    if src.dtype == torch.float8_e4m3fn:
        assert src_scales is not None
        values = values * src_scales[src_ids][..., None, None, None]
    if dst.dtype == torch.float8_e4m3fn:
        assert dst_scales is not None
        amax = values.abs().amax(dim=(3, 4, 5))
        # a tensor divisor: on CUDA, torch divides by a Python scalar as a multiplication
        # by its reciprocal, which is not correctly rounded (the kernel's div_rn is)
        scale = torch.where(amax > 0, amax / torch.full_like(amax, E4M3_MAX),
                            torch.ones_like(amax))
        codes = (values / scale[..., None, None, None]).clamp(-E4M3_MAX, E4M3_MAX)
        dst[dst_ids] = codes.to(torch.float8_e4m3fn)
        dst_scales[dst_ids] = scale
    else:
        dst[dst_ids] = values.to(dst.dtype)
