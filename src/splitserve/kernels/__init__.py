"""Triton kernels for paged KV attention and KV page movement, each with a torch reference.

Every kernel is a private `@triton.jit _name_kernel`, a host wrapper `name(...)` that
validates arguments (raising `KernelArgumentError`) and launches it, and a
plain-torch `ref_name(...)` with the same signature beside it.

For the engine (`attention_backend: auto | torch | triton`; auto = triton where
`triton_available(device)`, i.e. on CUDA, and torch on CPU), the three hot-path
wrappers and their torch equivalents are:

    paged_decode_attention(q, kv_layer, page_tables, seq_lens, scale, num_splits=None) -> out
        q [B, H, D]; kv_layer = pool[:, layer] [num_pages, 2, page_size, Hkv, D];
        page_tables int32|int64 [B, max_pages];
        seq_lens int32|int64 [B] (incl. the current token)
    paged_prefill_attention(q, kv_layer, cu_query_lens, seq_lens, page_tables, scale) -> out
        q [T, H, D]; cu_query_lens int32|int64 [B + 1];
        seq_lens int32|int64 [B] incl. the new tokens
    store_kv(k, v, kv_layer, slot_mapping) -> None
        k, v [T, Hkv, D] in the pool's dtype; slot_mapping int64 [T], negative = skip

The `ref_*` versions of these three are exact but slow (a Python loop over
sequences); the engine's torch backend should keep its own batched torch path and
use the refs only to test against. Transfer and layout helpers work on the whole
pool `[num_pages, num_layers, 2, page_size, Hkv, D]` or on staging tensors:
`pack_pages`, `unpack_pages`, `copy_pages` (e.g. copying the prompt's partial
last page into an owned page), `resize_pages`, `convert_pages_dtype`,
`split_page_heads`, `merge_page_heads`.

On CPU the kernels run only under `TRITON_INTERPRET=1`, which is for tests (about
1 ms per program instance) and must be set before `triton` is first imported in the
process: importing this package imports triton, so the engine should import it
lazily, only when the triton backend is selected.
"""

from __future__ import annotations

from splitserve.kernels.backend import interpreter_enabled, triton_available
from splitserve.kernels.decode_attention import (
    default_num_splits,
    paged_decode_attention,
    ref_paged_decode_attention,
)
from splitserve.kernels.errors import KernelArgumentError
from splitserve.kernels.page_copy import (
    copy_pages,
    pack_pages,
    ref_copy_pages,
    ref_pack_pages,
    ref_unpack_pages,
    unpack_pages,
)
from splitserve.kernels.page_dtype import convert_pages_dtype, ref_convert_pages_dtype
from splitserve.kernels.page_heads import (
    merge_page_heads,
    ref_merge_page_heads,
    ref_split_page_heads,
    split_page_heads,
)
from splitserve.kernels.page_resize import ref_resize_pages, resize_pages
from splitserve.kernels.prefill_attention import (
    paged_prefill_attention,
    ref_paged_prefill_attention,
)
from splitserve.kernels.store_kv import ref_store_kv, store_kv

__all__ = [
    "KernelArgumentError",
    "convert_pages_dtype",
    "copy_pages",
    "default_num_splits",
    "interpreter_enabled",
    "merge_page_heads",
    "pack_pages",
    "paged_decode_attention",
    "paged_prefill_attention",
    "ref_convert_pages_dtype",
    "ref_copy_pages",
    "ref_merge_page_heads",
    "ref_pack_pages",
    "ref_paged_decode_attention",
    "ref_paged_prefill_attention",
    "ref_resize_pages",
    "ref_split_page_heads",
    "ref_store_kv",
    "ref_unpack_pages",
    "resize_pages",
    "split_page_heads",
    "store_kv",
    "triton_available",
    "unpack_pages",
]
