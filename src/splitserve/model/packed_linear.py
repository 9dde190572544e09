"""Linear layers with their weights reordered once into oneDNN's blocked layout (CPU).

`F.linear` on a CPU hands the plain `[out, in]` weight to MKL (fp32) or oneDNN (bf16),
which reorder it into their blocked layout on every call: for the 1-16 token matmuls
of a decode step that reorder is a large part of the work (18% of all fp32 CPU time
on the engine benchmark). `prepack_linears` does the reorder once at load time, as
inductor's CPU path and vLLM's CPU engine do, with torch's own ops
(`mkldnn._reorder_linear_weight`, `mkldnn._linear_pointwise`).

Measured on the 2-core box (SmolLM2-135M shapes, 2 threads, µs per call, best of 5):

| linear (out×in) | bf16 M=1 | bf16 M=16 | fp32 M=1 | fp32 M=9 | fp32 M=16 |
|---|---|---|---|---|---|
| qkv 960×576, F.linear | 43 | 50 | 17 | 75 | 87 |
| qkv 960×576, packed | 23 | 25 | 25 | 42 | 66 |
| gate_up 3072×576, F.linear | 115 | 127 | 130 | 374 | 364 |
| gate_up 3072×576, packed | 51 | 65 | 151 | 196 | 266 |

bf16 results are bit-identical to `F.linear`; fp32 ones differ in the last bits
(~1e-4 absolute on these layers). fp32 layers keep a second copy of the weight for
calls with up to 128 rows (a decode step, a short prefill chunk): the native
`small_linear` kernel's panels of 16 output rows, K-major, each streamed once and
multiplied by every input row's broadcast inputs (native/small_linear.cpp: SmolLM2's
121 linears, one thread, 16 rows 61 → 46-48 ms against the dot-product kernel it
replaced, 64 rows 151 → 140 ms against the packed weight). Without it, at most
`FP32_PLAIN_MAX_ROWS` rows go to MKL's own small-M path, which beats the packed weight.

Where the weight comes from a GGUF file's Q4_1 or Q8_0 blocks (the default model: all
121 linears), the few-row path reads those blocks instead of fp32 panels
(`QuantPanels`, model/quant.py): the same output bits from a fifth of the bytes, so a
decode step's linears are no longer bound by streaming 540 MB of fp32 weights (121
linears, one thread, 1 / 8 / 16 / 64 / 128 rows: 33.0 / 37.0 / 40.5 / 115.7 / 238.5 ms
from fp32 panels, 11.8 / 20.6 / 31.8 / 104.4 / 216.9 ms from the blocks).

A layer that only ever sees a step's sampled rows (the lm_head: `compute_logits` gets
one row per sequence) keeps the few-row path alone in fp32 (`PanelLinear`): calls of more
rows than the kernel takes go through it in slices. For SmolLM2, whose lm_head is the
embedding (tied), that is 113 MB less per fp32 worker than panels plus oneDNN's copy.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model.quant import KINDS, QuantizedWeight, qpack
from splitserve.native import load_extension

log = logging.getLogger(__name__)

# fp32 rows up to which plain F.linear (MKL's small-M path) beats the packed weight: the
# four linears of a SmolLM2 layer, 1 thread, µs: M=3 450 plain vs 552 packed; M=4 1294 vs
# 536; M=16 1322 vs 986; M=256 9177 vs 8656.
FP32_PLAIN_MAX_ROWS = 3


class FewRows(Protocol):
    """A weight's path for calls of up to `max_rows` rows: flat x `[rows, in]` →
    `[rows, out]`."""

    @property
    def max_rows(self) -> int: ...

    def __call__(self, flat: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class Panels:
    """The native kernel's fp32 panels of the weight (`small.pack`)."""

    small: ModuleType
    panels: torch.Tensor
    out_features: int

    @property
    def max_rows(self) -> int:
        return int(self.small.max_rows)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        return self.small.linear(flat, self.panels, self.out_features)


@dataclass(frozen=True, eq=False)
class QuantPanels:
    """The weight as its GGUF file quantized it, in the native kernel's layout (`qpack`):
    the same bits as `Panels` of the dequantized weight, from a fifth of the bytes."""

    small: ModuleType
    qpanels: torch.Tensor
    kind: int
    out_features: int

    @property
    def max_rows(self) -> int:
        return int(self.small.max_rows)

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        return self.small.qlinear(flat, self.qpanels, self.kind, self.out_features)


@dataclass(frozen=True, eq=False)
class PlainWeight:
    """The plain fp32 weight for MKL's small-M path, where the kernel is not built."""

    weight: torch.Tensor
    max_rows: int = FP32_PLAIN_MAX_ROWS

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        return F.linear(flat, self.weight)


def few_rows_path(weight: torch.Tensor, small: ModuleType | None,
                  quantized: QuantizedWeight | None = None) -> FewRows:
    """The fp32 weight's few-row path: its quantized blocks where the file kept them,
    else its fp32 panels, through the kernel where it was built; else MKL's."""
    if small is None:
        return PlainWeight(weight.detach(), FP32_PLAIN_MAX_ROWS)
    out_features = weight.shape[0]
    if quantized is not None and quantized.shape == tuple(weight.shape):
        return QuantPanels(small, qpack(quantized), KINDS[quantized.kind][0], out_features)
    return Panels(small, small.pack(weight.detach()), out_features)


def in_slices(few: FewRows, x: torch.Tensor) -> torch.Tensor:
    """x `[..., in]` · Wᵀ through `few`, in slices of its `max_rows` rows (one call where
    x has no more)."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features).contiguous()
    step = few.max_rows
    slices = [few(flat[i:i + step]) for i in range(0, rows, step)]
    y = slices[0] if len(slices) == 1 else torch.cat(slices)
    return y.view(*x.shape[:-1], y.shape[-1])


class PackedLinear(nn.Module):
    """y `[..., out]` = x `[..., in]` · Wᵀ with W `[out, in]` held in oneDNN's layout.

    bf16 keeps only the packed weight; fp32 keeps a second form for calls with few rows
    (`few`, see `few_rows_path`). No bias: the Llama layers have none.
    """

    def __init__(self, weight: torch.Tensor, few: FewRows | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.few = few

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.few is not None and x.numel() // self.in_features <= self.few.max_rows:
            return in_slices(self.few, x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        few = "" if self.few is None else f" + {type(self.few).__name__}"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed{few}"


class PanelLinear(nn.Module):
    """fp32 y `[..., out]` = x `[..., in]` · Wᵀ from the native kernel's (quantized)
    panels alone, for layers called with few rows (the lm_head); larger calls go
    through in slices of the kernel's `max_rows`. A row's bits do not depend on the
    call's other rows."""

    def __init__(self, weight: torch.Tensor, few: Panels | QuantPanels) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.few = few

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_slices(self.few, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{type(self.few).__name__}")


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def small_linear_kernel() -> ModuleType | None:
    """The native few-row fp32 kernel, or None where it cannot be built or this CPU has
    no AVX-512."""
    module = load_extension("small_linear")
    return module if module is not None and module.available() else None


def prepack_linears(model: nn.Module, few_rows: Collection[str] = (),
                    quantized: Mapping[str, QuantizedWeight] | None = None) -> int:
    """Replace every bias-free `nn.Linear` under `model` by a `PackedLinear` (in place),
    or, for the fp32 ones named in `few_rows` (called with a step's sampled rows only)
    where the native kernel is built, by a `PanelLinear`; return how many were replaced.
    `quantized`: layers' GGUF blocks by module name (fp32 layers named there take them
    for their few-row path). The model's weights must be final: a later
    `load_state_dict` does not reach the packed copies."""
    small = small_linear_kernel() if any(
        p.dtype == torch.float32 for p in model.parameters()) else None
    quantized = quantized or {}
    names = {id(module): name for name, module in model.named_modules()}
    num_packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Linear) and child.bias is None
                    and can_prepack(child.weight)):
                continue
            full, weight = names[id(child)], child.weight
            few = (few_rows_path(weight, small, quantized.get(full))
                   if weight.dtype == torch.float32 else None)
            layer: nn.Module = (PanelLinear(weight, few)
                                if isinstance(few, (Panels, QuantPanels)) and full in few_rows
                                else PackedLinear(weight, few))
            setattr(parent, name, layer)
            num_packed += 1
    log.debug("prepacked %d linear layers", num_packed)
    return num_packed
