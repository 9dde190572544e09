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

A layer that only ever sees a step's sampled rows (the lm_head: `compute_logits` gets
one row per sequence) keeps the panels alone in fp32 (`PanelLinear`): calls of more
rows than the kernel takes go through it in slices. For SmolLM2, whose lm_head is the
embedding (tied), that is 113 MB less per fp32 worker than panels plus oneDNN's copy.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.native import load_extension

log = logging.getLogger(__name__)

# fp32 rows up to which plain F.linear (MKL's small-M path) beats the packed weight: the
# four linears of a SmolLM2 layer, 1 thread, µs: M=3 450 plain vs 552 packed; M=4 1294 vs
# 536; M=16 1322 vs 986; M=256 9177 vs 8656.
FP32_PLAIN_MAX_ROWS = 3


def panel_linear(small: ModuleType, panels: torch.Tensor, out_features: int,
                 x: torch.Tensor) -> torch.Tensor:
    """x `[..., in]` · Wᵀ through the native kernel from W's `panels`, in slices of the
    kernel's `max_rows` rows (one call where x has no more)."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features).contiguous()
    step = int(small.max_rows)
    slices = [small.linear(flat[i:i + step], panels, out_features) for i in range(0, rows, step)]
    y = slices[0] if len(slices) == 1 else torch.cat(slices)
    return y.view(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y `[..., out]` = x `[..., in]` · Wᵀ with W `[out, in]` held in oneDNN's layout.

    bf16 keeps only the packed weight; fp32 keeps a second copy for calls with few rows:
    the native kernel's panels (`small`, up to its `max_rows`) where it was built, else
    the plain weight for MKL, up to `FP32_PLAIN_MAX_ROWS`. No bias: the Llama layers
    have none.
    """

    def __init__(self, weight: torch.Tensor, small: ModuleType | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        fp32 = weight.dtype == torch.float32
        self.small = small if fp32 else None
        self.small_max_rows = 0 if self.small is None else int(self.small.max_rows)
        self.panels = None if self.small is None else self.small.pack(weight.detach())
        self.plain = weight.detach() if fp32 and self.small is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.small is not None and self.panels is not None and rows <= self.small_max_rows:
            return panel_linear(self.small, self.panels, self.out_features, x)
        if self.plain is not None and rows <= FP32_PLAIN_MAX_ROWS:
            return F.linear(x, self.plain)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


class PanelLinear(nn.Module):
    """fp32 y `[..., out]` = x `[..., in]` · Wᵀ from the native kernel's panels alone,
    for layers called with few rows (the lm_head); larger calls go through in slices of
    the kernel's `max_rows`. A row's bits do not depend on the call's other rows."""

    def __init__(self, weight: torch.Tensor, small: ModuleType) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.small = small
        self.panels = small.pack(weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return panel_linear(self.small, self.panels, self.out_features, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, panels"


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def small_linear_kernel() -> ModuleType | None:
    """The native few-row fp32 kernel, or None where it cannot be built or this CPU has
    no AVX-512."""
    module = load_extension("small_linear")
    return module if module is not None and module.available() else None


def prepack_linears(model: nn.Module, few_rows: Collection[str] = ()) -> int:
    """Replace every bias-free `nn.Linear` under `model` by a `PackedLinear` (in place),
    or, for the fp32 ones named in `few_rows` (called with a step's sampled rows only)
    where the native kernel is built, by a `PanelLinear`; return how many were replaced.
    The model's weights must be final: a later `load_state_dict` does not reach the
    packed copies."""
    small = small_linear_kernel() if any(
        p.dtype == torch.float32 for p in model.parameters()) else None
    names = {id(module): name for name, module in model.named_modules()}
    num_packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Linear) and child.bias is None
                    and can_prepack(child.weight)):
                continue
            layer: nn.Module
            if (small is not None and child.weight.dtype == torch.float32
                    and names[id(child)] in few_rows):
                layer = PanelLinear(child.weight, small)
            else:
                layer = PackedLinear(child.weight, small)
            setattr(parent, name, layer)
            num_packed += 1
    log.debug("prepacked %d linear layers", num_packed)
    return num_packed
