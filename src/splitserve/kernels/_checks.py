"""Argument validation shared by the kernel wrappers.

Checks run on the host from shapes, dtypes and strides only: reading a CUDA
tensor's values would force a device sync on every call. Page ids given as a
Python sequence or a CPU tensor are bounds-checked; ids already on the GPU are
trusted (the engine and the transfer layer own their validity).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitserve.kernels.errors import KernelArgumentError

PageIds = Sequence[int] | torch.Tensor

_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise KernelArgumentError(
            name, f"expected {ndim} dims {layout}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise KernelArgumentError(name, f"dtype {t.dtype} not supported; expected one of {allowed}")


def check_same_device(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named_tensors[0]
    for name, t in named_tensors[1:]:
        if t.device != first.device:
            raise KernelArgumentError(
                name, f"is on {t.device} but {first_name} is on {first.device}"
            )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelArgumentError(name, f"last dim must have stride 1, got strides {t.stride()}")


def check_pages_contiguous(name: str, pages: torch.Tensor) -> None:
    """Each page (index on dim 0) must be one dense block, as in the KV pool."""
    expected = 1
    for size, stride in reversed(list(zip(pages.shape[1:], pages.stride()[1:], strict=True))):
        if size > 1 and stride != expected:
            raise KernelArgumentError(
                name, f"each page must be contiguous; got shape {tuple(pages.shape)} "
                f"strides {pages.stride()}"
            )
        expected *= size


def as_page_ids(name: str, page_ids: PageIds, num_pages: int, device: torch.device) -> torch.Tensor:
    """Page ids as a 1-D int64 tensor on `device`, bounds-checked unless already on a GPU."""
    if isinstance(page_ids, torch.Tensor):
        if page_ids.dim() != 1:
            raise KernelArgumentError(
                name, f"expected a 1-D tensor, got shape {tuple(page_ids.shape)}")
        if page_ids.dtype not in (torch.int32, torch.int64):
            raise KernelArgumentError(name, f"expected int32 or int64 ids, got {page_ids.dtype}")
        ids = page_ids
    else:
        ids = torch.tensor(list(page_ids), dtype=torch.int64)
    if ids.device.type == "cpu" and ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_pages:
            raise KernelArgumentError(
                name, f"page ids must lie in [0, {num_pages}); got min {low}, max {high}"
            )
    return ids.to(device=device, dtype=torch.int64)


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """Same memory as an integer tensor of equal element size, for bit-exact copies."""
    return t.view(_BITS_DTYPES[t.element_size()])


def check_page_tensor(name: str, pages: torch.Tensor) -> None:
    """A pool or staging tensor `[n, num_layers, 2, page_size, num_kv_heads, head_dim]`."""
    check_ndim(name, pages, 6, "[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]")
    if pages.shape[2] != 2:
        raise KernelArgumentError(name, f"axis 2 must be 2 (K, V), got {pages.shape[2]}")
    check_pages_contiguous(name, pages)
