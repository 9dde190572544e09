"""Native (C++) ops on the KV pages for the CPU: decode attention in place, K/V store.

The torch path copies every decode sequence's K and V out of the pages each step and
layer (`index_select`) before SDPA reads them again; `native/paged_decode.cpp` reads
each K/V row once, where it lies. Its `store_kv` writes a step's new K/V rows into
their pages from the views the model hands over (no reshape copies). The module is
built on first use (see `splitserve.native`); where it cannot be built, the loaders
return None and the engine keeps the torch path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitserve.native import load_extension

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                       torch.Tensor]
StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                   None]


def load_paged_decode() -> PagedDecode | None:
    """`paged_decode(q [B, H, D], kv layer view [P, 2, page_size, KVH, D], page_tables
    int64 [B, W], seq_lens int64 [B], scale) → [B, H, D]` in the KV dtype, or None."""
    module = load_extension("paged_decode")
    if module is None:
        return None
    op: PagedDecode = module.paged_decode
    return op


def load_store_kv() -> StoreKV | None:
    """`store_kv(pool rows [R, KVH·D], k_rows int64 [T], v_rows int64 [T], k [T, KVH, D],
    v [T, KVH, D])`: k and v in the pool's dtype, heads adjacent; or None."""
    module = load_extension("paged_decode")
    if module is None:
        return None
    op: StoreKV = module.store_kv
    return op
