"""Builders for paged-KV test inputs: random pools, scattered page tables, poison.

Unused entries of page tables point at a page full of NaN, and the unused slots of
each sequence's partially filled last page are NaN too, so a kernel that reads one
token too many produces NaN and fails its comparison.
"""

from __future__ import annotations

import math

import torch


def make_pool(num_pages: int, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """A page-major pool `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_pages, num_layers, 2, page_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def assign_pages(seq_lens: list[int], page_size: int, num_pages: int, seed: int,
                 num_shared_pages: int = 0) -> torch.Tensor:
    """int32 page tables `[B, max_pages]` with scattered pages; the last pool page is
    the NaN poison page used as padding. With `num_shared_pages`, sequence 1 starts
    with sequence 0's first pages (a prefix-cache hit)."""
    gen = torch.Generator().manual_seed(seed)
    pages_needed = [math.ceil(n / page_size) for n in seq_lens]
    max_pages = max(max(pages_needed), 1) + 1  # one spare column of padding
    free = torch.randperm(num_pages - 1, generator=gen).tolist()
    poison = num_pages - 1
    table = torch.full((len(seq_lens), max_pages), poison, dtype=torch.int32)
    for seq, num in enumerate(pages_needed):
        shared = num_shared_pages if seq == 1 else 0
        if shared:
            assert shared * page_size <= min(seq_lens[0], seq_lens[1])
            table[1, :shared] = table[0, :shared]
        for i in range(shared, num):
            table[seq, i] = free.pop()
    return table


def poison(kv_layer: torch.Tensor, page_tables: torch.Tensor, seq_lens: list[int]) -> None:
    """NaN into the padding page and the unused tail of each sequence's last page."""
    page_size = kv_layer.shape[2]
    kv_layer[kv_layer.shape[0] - 1] = float("nan")
    for seq, seq_len in enumerate(seq_lens):
        if seq_len % page_size:
            last = int(page_tables[seq, seq_len // page_size])
            kv_layer[last, :, seq_len % page_size:] = float("nan")


def gather_kv(kv_layer: torch.Tensor, page_tables: torch.Tensor, seq: int,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous fp32 K and V `[seq_len, num_kv_heads, head_dim]` of one sequence."""
    page_size = kv_layer.shape[2]
    pages = kv_layer[page_tables[seq, :math.ceil(seq_len / page_size)].long()].float()
    k = pages[:, 0].reshape(-1, *kv_layer.shape[3:])[:seq_len]
    v = pages[:, 1].reshape(-1, *kv_layer.shape[3:])[:seq_len]
    return k, v


# Tolerances. The interpreter computes tl.dot in exact fp32; on a GPU fp32 inputs go
# through TF32 (10-bit mantissa, ~5e-4 relative per operand) and bf16 outputs are
# rounded to 8 bits (3.9e-3 relative), and the interpreter truncates that last
# rounding, so up to 2 ulp. Both bounds hold for either.
TOLERANCES = {
    torch.float32: {"atol": 3e-3, "rtol": 3e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
