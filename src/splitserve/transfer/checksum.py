"""Per-page checksums of KV pages: xxh3-64 over each page's raw bytes.

The pool is page-major, `[num_pages, num_layers, 2, page_size, num_kv_heads,
head_dim]`, so one page is one contiguous run of bytes and its checksum covers all
layers' K and V for its tokens. A prefill worker computes the checksums of the pages
it wrote and sends them in `KVReady.page_checksums`; the decode worker recomputes them
over its landing pages before using them (ARCHITECTURE.md, "The fence invariant"): a
mismatch, or a wrong number of checksums, fails the attempt and its pages are
quarantined.

Why xxh3-64: it is not cryptographic (the peer is trusted; this catches torn or
misdirected writes, not an attacker) and runs at memory speed, so the check costs a
small fraction of the transfer it guards (measured in benchmarks/kv_transfer.py:
`checksum_*` keys). 64 bits make an undetected corruption of a page ~2**-64 likely.

Values are unsigned 64-bit ints (`uint64` in protobuf) and depend only on the bytes,
so both sides agree whenever dtype and geometry agree (checked at first contact).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xxhash

from splitserve.transfer.errors import TransferError


class ChecksumCountMismatch(TransferError, ValueError):
    """The checksums received are not one per landing page: the attempt has failed.

    Raised by `verify_page_checksums` before any page is hashed; a caller treats it
    exactly as a mismatch (quarantine the pages, count a checksum failure).
    """

    def __init__(self, num_pages: int, num_checksums: int) -> None:
        super().__init__(f"{num_checksums} checksums for {num_pages} pages")
        self.num_pages = num_pages
        self.num_checksums = num_checksums


def page_checksums(pool_tensor: torch.Tensor, page_ids: Sequence[int]) -> list[int]:
    """xxh3-64 of the raw bytes of each page `pool_tensor[page_id]`, in `page_ids` order.

    `pool_tensor` is a page-major pool of any dtype, first axis the page id. A
    contiguous CPU pool is hashed in place: numpy views of its bytes, no copy. GPU
    memory (or a strided view) is first gathered into one host tensor holding just
    these pages: one device-to-host copy and one synchronization for all of them,
    instead of one per page. Raises `IndexError` for a page id outside the pool.
    """
    ids = _checked_page_ids(page_ids, pool_tensor)
    if not ids:
        return []
    if pool_tensor.device.type == "cpu" and pool_tensor.is_contiguous():
        rows = _page_bytes(pool_tensor)
        return [xxhash.xxh3_64_intdigest(rows[page_id]) for page_id in ids]
    index = torch.tensor(ids, dtype=torch.long, device=pool_tensor.device)
    host = pool_tensor.detach().index_select(0, index).cpu()
    return [xxhash.xxh3_64_intdigest(row) for row in _page_bytes(host)]


def verify_page_checksums(
    pool_tensor: torch.Tensor, page_ids: Sequence[int], expected: Sequence[int]
) -> list[int]:
    """Positions `i` where page `page_ids[i]` does not hash to `expected[i]`; [] when all match.

    Positions rather than page ids, so a caller can report both and duplicate ids stay
    unambiguous. Raises `ChecksumCountMismatch` when `expected` does not hold exactly
    one checksum per page (nothing is hashed then), `IndexError` for a page id outside
    the pool.
    """
    if len(expected) != len(page_ids):
        raise ChecksumCountMismatch(len(page_ids), len(expected))
    actual = page_checksums(pool_tensor, page_ids)
    return [i for i, (got, want) in enumerate(zip(actual, expected)) if got != int(want)]


def pages_intact(expected: Sequence[int]) -> Callable[[torch.Tensor, list[int]], bool]:
    """`(pool, page ids) -> whether every page hashes to its checksum in `expected``;
    pages with no checksum, or for other pages, count as not intact."""
    checksums = list(expected)

    def verify(pool_tensor: torch.Tensor, page_ids: list[int]) -> bool:
        try:
            return not verify_page_checksums(pool_tensor, page_ids, checksums)
        except ChecksumCountMismatch:
            return False

    return verify


def _checked_page_ids(page_ids: Sequence[int], pool_tensor: torch.Tensor) -> list[int]:
    """Page ids as Python ints, each in [0, num_pages): a negative id would silently
    hash a page counted from the end of the pool."""
    if pool_tensor.dim() < 1:
        raise ValueError("pool_tensor must have a page axis, got a 0-d tensor")
    num_pages = pool_tensor.shape[0]
    ids = [operator.index(page_id) for page_id in page_ids]
    outside = [page_id for page_id in ids if not 0 <= page_id < num_pages]
    if outside:
        raise IndexError(f"page ids outside the pool of {num_pages} pages: {outside[:8]}")
    return ids


def _page_bytes(pages: torch.Tensor) -> np.ndarray:
    """`[num_pages, bytes_per_page]` uint8 numpy view of a contiguous CPU tensor's bytes.

    Reshaping first gives the last axis stride 1, which `view(torch.uint8)` needs for
    dtypes wider than a byte; numpy has no bfloat16, so the dtype view comes before
    `.numpy()`.
    """
    return pages.detach().reshape(pages.shape[0], -1).view(torch.uint8).numpy()
