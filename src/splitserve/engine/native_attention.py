"""Native (C++) decode attention over the KV pages in place, for the CPU.

The torch path copies every decode sequence's K and V out of the pages each step and
layer (`index_select`) before SDPA reads them again; `native/paged_decode.cpp` reads
each K/V row once, where it lies. It is built on first use (see `splitserve.native`);
where it cannot be built, `load_paged_decode` returns None and the engine keeps the
torch path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from splitserve.native import load_extension

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                       torch.Tensor]


def load_paged_decode() -> PagedDecode | None:
    """`paged_decode(q [B, H, D], kv layer view [P, 2, page_size, KVH, D], block_tables
    int64 [B, W], seq_lens int64 [B], scale) → [B, H, D]` in the KV dtype, or None."""
    module = load_extension("paged_decode")
    if module is None:
        return None
    op: PagedDecode = module.paged_decode
    return op
