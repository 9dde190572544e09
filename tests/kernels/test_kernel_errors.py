"""Every KernelArgumentError a wrapper raises, with the argument it names."""

from __future__ import annotations

import re

import pytest
import torch

from splitserve.errors import SplitserveError
from splitserve.kernels import (
    KernelArgumentError,
    convert_pages_dtype,
    copy_pages,
    merge_page_heads,
    pack_pages,
    paged_decode_attention,
    paged_prefill_attention,
    resize_pages,
    split_page_heads,
    store_kv,
    unpack_pages,
)

E4M3 = torch.float8_e4m3fn


def _raises(argument: str, message: str):
    return pytest.raises(KernelArgumentError, match=re.escape(f"{argument}: ") + message)


def _decode_args(**overrides):
    args = {
        "q": torch.zeros(2, 4, 16),
        "kv_layer": torch.zeros(5, 3, 2, 4, 2, 16)[:, 1],
        "page_tables": torch.zeros(2, 3, dtype=torch.int32),
        "seq_lens": torch.ones(2, dtype=torch.int32),
        "scale": 0.25,
    }
    args.update(overrides)
    return args


def _pages(n=4, layers=2, page_size=16, heads=2, head_dim=8, dtype=torch.bfloat16):
    return torch.zeros(n, layers, 2, page_size, heads, head_dim, dtype=dtype)


def test_error_is_a_splitserve_error_with_the_argument():
    with pytest.raises(SplitserveError) as info:
        paged_decode_attention(**_decode_args(q=torch.zeros(2, 4)))
    assert isinstance(info.value, KernelArgumentError)
    assert info.value.argument == "q"


@pytest.mark.parametrize("overrides,argument,message", [
    ({"q": torch.zeros(2, 4)}, "q", r"expected 3 dims"),
    ({"q": torch.zeros(2, 4, 16, dtype=torch.int32)}, "q", r"dtype torch.int32 not supported"),
    ({"kv_layer": torch.zeros(5, 3, 4, 2, 16)}, "kv_layer", r"axis 1 must be 2 \(K, V\), got 3"),
    ({"kv_layer": torch.zeros(5, 2, 4, 2, 8)}, "kv_layer",
     r"head_dim 8 differs from q's head_dim 16"),
    ({"kv_layer": torch.zeros(5, 2, 4, 3, 16)}, "q",
     r"num_heads 4 is not a multiple of num_kv_heads 3"),
    ({"kv_layer": torch.zeros(5, 2, 4, 2, 16).transpose(3, 4).contiguous().transpose(3, 4)},
     "kv_layer", r"last dim must have stride 1"),
    ({"page_tables": torch.zeros(2, 3)}, "page_tables", r"dtype torch.float32 not supported"),
    ({"page_tables": torch.zeros(3, 3, dtype=torch.int32),
      "seq_lens": torch.ones(3, dtype=torch.int32)},
     "page_tables", r"has 3 rows for a batch of 2"),
    ({"seq_lens": torch.ones(3, dtype=torch.int32)}, "seq_lens",
     r"has 3 entries but page_tables has 2 rows"),
    ({"seq_lens": torch.ones(2, dtype=torch.int32, device="meta")}, "seq_lens",
     r"is on meta but q is on cpu"),
    ({"num_splits": 0}, "num_splits", r"must be >= 1, got 0"),
])
def test_decode_attention_errors(overrides, argument, message):
    with _raises(argument, message):
        paged_decode_attention(**_decode_args(**overrides))


def test_prefill_attention_errors():
    args = _decode_args()
    q, kv, bt, lens = args["q"], args["kv_layer"], args["page_tables"], args["seq_lens"]
    with _raises("cu_query_lens", r"has 2 entries for 2 sequences; expected 3"):
        paged_prefill_attention(q, kv, torch.tensor([0, 2], dtype=torch.int32), lens, bt, 0.25)
    with _raises("cu_query_lens", r"dtype torch.float32 not supported"):
        paged_prefill_attention(q, kv, torch.zeros(3), lens, bt, 0.25)
    with _raises("cu_query_lens", r"expected 1 dims"):
        paged_prefill_attention(q, kv, torch.zeros(3, 1, dtype=torch.int32), lens, bt, 0.25)


def test_store_kv_errors():
    kv_layer = torch.zeros(4, 2, 8, 2, 16)
    k = torch.zeros(3, 2, 16)
    slots = torch.arange(3)
    with _raises("k", r"dtype torch.bfloat16 differs from kv_layer's torch.float32"):
        store_kv(k.bfloat16(), k, kv_layer, slots)
    with _raises("v", r"per-token shape \(2, 8\) differs from the pool's"):
        store_kv(k, torch.zeros(3, 2, 8), kv_layer, slots)
    with _raises("slot_mapping", r"k, v and slot_mapping disagree on T: 3, 3, 2"):
        store_kv(k, k, kv_layer, slots[:2])
    with _raises("slot_mapping", r"dtype torch.float32 not supported"):
        store_kv(k, k, kv_layer, slots.float())
    with _raises("kv_layer", r"axis 1 must be 2"):
        store_kv(k, k, torch.zeros(4, 1, 8, 2, 16), slots)


def test_page_copy_errors():
    pool = _pages(n=6)
    with _raises("page_ids", r"page ids must lie in \[0, 6\); got min 0, max 6"):
        pack_pages(pool, [0, 6])
    with _raises("page_ids", r"expected a 1-D tensor, got shape \(1, 2\)"):
        pack_pages(pool, torch.tensor([[0, 1]]))
    with _raises("page_ids", r"expected int32 or int64 ids"):
        pack_pages(pool, torch.tensor([0.0]))
    with _raises("out", r"has 3 pages for 2 page ids"):
        pack_pages(pool, [0, 1], out=_pages(n=3))
    with _raises("out", r"page format .* differs from pool's"):
        pack_pages(pool, [0, 1], out=_pages(n=2, dtype=torch.float32))
    with _raises("pool", r"each page must be contiguous"):
        pack_pages(pool.transpose(3, 4), [0])
    with _raises("staging", r"has 1 pages for 2 page ids"):
        unpack_pages(_pages(n=1), pool, [0, 1])
    with _raises("dst_page_ids", r"has 1 ids for 2 source pages"):
        copy_pages(pool, [0, 1], [2])


def test_resize_errors():
    src, dst = _pages(page_size=16), _pages(page_size=64)
    with _raises("dst.page_size", r"page sizes 16 \(src\) and 24 \(dst\) do not divide each other"):
        resize_pages(src, [0, 1], 20, _pages(page_size=24), [0])
    with _raises("src_page_ids", r"too few pages: 2 pages of 16 tokens hold 32 tokens, 40 need 3"):
        resize_pages(src, [0, 1], 40, dst, [0])
    with _raises("dst_page_ids", r"too few pages: 1 pages of 64 tokens hold 64 tokens, 65 need 2"):
        resize_pages(src, [0, 1, 2, 3, 0], 65, dst, [0])
    with _raises("dst", r"dtype torch.float32 differs from src's torch.bfloat16"):
        resize_pages(src, [0], 4, _pages(page_size=64, dtype=torch.float32), [0])
    with _raises("dst.num_kv_heads", r"4 differs from src's 2"):
        resize_pages(src, [0], 4, _pages(page_size=64, heads=4), [0])
    with _raises("num_tokens", r"must be >= 0, got -1"):
        resize_pages(src, [0], -1, dst, [0])
    with _raises("src", r"axis 2 must be 2"):
        resize_pages(torch.zeros(4, 2, 3, 16, 2, 8), [0], 4, dst, [0])


def test_dtype_conversion_errors():
    bf16, scales = _pages(), torch.ones(4, 2, 2)
    with _raises("dst", r"unknown KV dtype torch.int8"):
        convert_pages_dtype(bf16, _pages(dtype=torch.int8))
    with _raises("src", r"unknown KV dtype torch.float8_e5m2"):
        convert_pages_dtype(_pages(dtype=torch.float8_e5m2), bf16)
    with _raises("dst_scales", r"float8_e4m3fn pages need a scales tensor"):
        convert_pages_dtype(bf16, _pages(dtype=E4M3))
    with _raises("src_scales", r"expected float32 \(4, 2, 2\) \(pages, layers, K/V\)"):
        convert_pages_dtype(_pages(dtype=E4M3), bf16, src_scales=torch.ones(4, 2))
    with _raises("dst", r"float8_e4m3fn to float8_e4m3fn is not a conversion"):
        convert_pages_dtype(_pages(dtype=E4M3), _pages(dtype=E4M3), src_scales=scales,
                            dst_scales=scales)
    with _raises("dst", r"page shape .* differs from src's"):
        convert_pages_dtype(bf16, _pages(page_size=64, dtype=torch.float32))
    with _raises("dst_page_ids", r"2 destination pages for 4 source pages"):
        convert_pages_dtype(bf16, _pages(dtype=torch.float32), dst_page_ids=[0, 1])


def test_head_split_merge_errors():
    pages = _pages(heads=6)
    with _raises("num_shards", r"num_kv_heads 6 is not divisible by 4 shards"):
        split_page_heads(pages, 4)
    with _raises("num_shards", r"must be >= 1, got 0"):
        split_page_heads(pages, 0)
    with _raises("pages", r"must be a contiguous staging tensor"):
        split_page_heads(_pages(n=8, heads=6)[::2], 2)
    with _raises("shards", r"need at least one shard"):
        merge_page_heads([])
    with _raises("shards[1]",
                 r"shape \(4, 2, 2, 16, 3, 8\) torch.bfloat16 differs from shards\[0\]'s"):
        merge_page_heads([_pages(heads=2), _pages(heads=3)])
