"""Receiving-side page conversion: page size, dtype (incl. fp8 with scales), KV heads."""

from __future__ import annotations

import pytest
import torch
from paged_kv_cases import make_pool

from splitserve.kernels.page_dtype import convert_pages_dtype, ref_convert_pages_dtype
from splitserve.kernels.page_heads import (
    merge_page_heads,
    ref_merge_page_heads,
    ref_split_page_heads,
    split_page_heads,
)
from splitserve.kernels.page_resize import ref_resize_pages, resize_pages

E4M3 = torch.float8_e4m3fn


def _tokens(pages: torch.Tensor, page_ids: list[int], num_tokens: int) -> torch.Tensor:
    """Token-major `[num_tokens, L, 2, H, D]` view of a sequence's pages."""
    per_token = pages[page_ids].permute(0, 3, 1, 2, 4, 5)  # [n, page_size, L, 2, H, D]
    return per_token.reshape(-1, *per_token.shape[2:])[:num_tokens]


@pytest.mark.parametrize("num_tokens", [70, 64, 1], ids=["partial", "whole", "one-token"])
def test_resize_16_to_64_to_16_is_exact(num_tokens, device):
    src = make_pool(9, 2, 16, 3, 64, torch.bfloat16, device, seed=7)
    src_ids = [8, 2, 5, 0, 6][:-(-num_tokens // 16)]
    big = torch.zeros(4, 2, 2, 64, 3, 64, dtype=torch.bfloat16, device=device)
    expected_big = big.clone()
    resize_pages(src, src_ids, num_tokens, big, [3, 1])
    ref_resize_pages(src, src_ids, num_tokens, expected_big, [3, 1])
    assert torch.equal(big, expected_big)

    back = torch.full_like(src, 7.0)
    back_ids = [1, 3, 4, 7, 8][:len(src_ids)]
    resize_pages(big, [3, 1], num_tokens, back, back_ids)
    assert torch.equal(_tokens(back, back_ids, num_tokens), _tokens(src, src_ids, num_tokens))
    # Slots past num_tokens in the last destination page are left as they were.
    tail = back[back_ids[-1], :, :, (num_tokens - 1) % 16 + 1:]
    assert torch.equal(tail, torch.full_like(tail, 7.0))


def test_resize_odd_sizes_matches_reference(device):
    src = make_pool(5, 1, 12, 1, 40, torch.float32, device, seed=8)
    dst = torch.zeros(4, 1, 2, 4, 1, 40, device=device)
    expected = dst.clone()
    resize_pages(src, [4, 1], 15, dst, [2, 0, 3, 1])
    ref_resize_pages(src, [4, 1], 15, expected, [2, 0, 3, 1])
    assert torch.equal(dst, expected)


def _wide_range_pages(device: torch.device) -> torch.Tensor:
    """bf16 pages whose (page, layer, K/V) slabs span 1e-6..1e3, with an all-zero slab."""
    pages = make_pool(4, 2, 16, 2, 64, torch.float32, device, seed=9)
    pages = pages * torch.logspace(-6, 3, 4, device=device)[:, None, None, None, None, None]
    pages[1, 1, 0] = 0.0
    return pages.to(torch.bfloat16)


def test_fp32_bf16_conversions_match_torch_bitwise(device):
    src32 = make_pool(3, 2, 16, 2, 64, torch.float32, device, seed=10) * 37.0
    bf = torch.empty(3, 2, 2, 16, 2, 64, dtype=torch.bfloat16, device=device)
    convert_pages_dtype(src32, bf)
    assert torch.equal(bf.view(torch.int16), src32.to(torch.bfloat16).view(torch.int16))  # RTNE
    back = torch.empty_like(src32)
    convert_pages_dtype(bf, back, src_page_ids=[2, 0, 1], dst_page_ids=[0, 1, 2])
    assert torch.equal(back, bf[[2, 0, 1]].float())
    again = torch.empty_like(bf)
    convert_pages_dtype(back, again, src_page_ids=[1, 2, 0])
    assert torch.equal(again, bf)  # bf16 -> fp32 -> bf16 is exact


def test_fp8_quantize_matches_reference_bitwise(device):
    src = _wide_range_pages(device)
    fp8 = torch.zeros(6, *src.shape[1:], dtype=E4M3, device=device)
    scales = torch.zeros(6, 2, 2, device=device)
    expected, expected_scales = fp8.clone(), scales.clone()
    convert_pages_dtype(src, fp8, dst_page_ids=[5, 0, 2, 3], dst_scales=scales)
    ref_convert_pages_dtype(src, expected, dst_page_ids=[5, 0, 2, 3], dst_scales=expected_scales)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(fp8.view(torch.uint8), expected.view(torch.uint8))
    assert scales[0, 1, 0] == 1.0  # the all-zero slab keeps a unit scale


def test_fp8_rounding_edges_match_torch(device):
    """Ties, subnormals and carries into the exponent, with the scale pinned to 1."""
    values = torch.tensor([448.0, -448.0, 31.5, 31.6, -124.4, 0.015625, 0.0146484375,
                           0.0009765625, 0.0029296875, 0.0048828125, 2.0 ** -10, 3 * 2.0 ** -11,
                           1e-30, 0.0, -0.0, 1.0625, 1.1875, -17.0, 240.0, 232.0])
    src = torch.zeros(1, 1, 2, 4, 1, 16, device=device)
    src.view(-1)[: values.numel()] = values.to(device)
    src.view(2, -1)[1, : values.numel()] = values.to(device)
    fp8 = torch.empty(1, 1, 2, 4, 1, 16, dtype=E4M3, device=device)
    scales = torch.empty(1, 1, 2, device=device)
    convert_pages_dtype(src, fp8, dst_scales=scales)
    assert torch.equal(scales, torch.ones_like(scales))
    assert torch.equal(fp8.view(torch.uint8), src.to(E4M3).view(torch.uint8))


def test_bf16_fp8_bf16_round_trip_within_fp8_tolerance(device):
    src = _wide_range_pages(device)
    fp8 = torch.empty(src.shape, dtype=E4M3, device=device)
    scales = torch.empty(src.shape[0], 2, 2, device=device)
    convert_pages_dtype(src, fp8, dst_scales=scales)
    back = torch.empty_like(src)
    convert_pages_dtype(fp8, back, src_scales=scales)
    expected = torch.empty_like(src)
    ref_convert_pages_dtype(fp8, expected, src_scales=scales)
    assert torch.equal(back.view(torch.int16), expected.view(torch.int16))
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals, absolute <= scale * 2^-10
    # for subnormals; plus the final bf16 rounding (2^-9 relative).
    slab_scale = scales[..., None, None, None]
    bound = src.float().abs() * (2.0 ** -4 + 2.0 ** -9) + slab_scale * 2.0 ** -10
    assert ((back.float() - src.float()).abs() <= bound).all()


@pytest.mark.parametrize("num_kv_heads,num_shards", [(8, 2), (6, 3), (3, 3), (4, 1)])
def test_head_split_then_merge_is_exact(num_kv_heads, num_shards, device):
    pages = make_pool(3, 2, 16, num_kv_heads, 64, torch.bfloat16, device, seed=11)
    shards = split_page_heads(pages, num_shards)
    expected = ref_split_page_heads(pages, num_shards)
    assert len(shards) == num_shards
    for shard, ref in zip(shards, expected, strict=True):
        assert shard.shape == (3, 2, 2, 16, num_kv_heads // num_shards, 64)
        assert torch.equal(shard, ref)
    merged = merge_page_heads(shards)
    assert torch.equal(merged, ref_merge_page_heads(expected))
    assert torch.equal(merged, pages)
