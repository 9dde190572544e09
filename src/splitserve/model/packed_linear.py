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
(~1e-4 absolute on these layers). For fp32 with at most `FP32_PLAIN_MAX_ROWS` rows MKL's
own path stays faster, so fp32 layers keep their plain weight too.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# fp32 rows up to which plain F.linear (MKL's small-M path) beats the packed weight: the
# four linears of a SmolLM2 layer, 1 thread, µs: M=3 450 plain vs 552 packed; M=4 1294 vs
# 536; M=16 1322 vs 986; M=256 9177 vs 8656.
FP32_PLAIN_MAX_ROWS = 3


class PackedLinear(nn.Module):
    """y `[..., out]` = x `[..., in]` · Wᵀ with W `[out, in]` held in oneDNN's layout.

    bf16 keeps only the packed weight; fp32 keeps the plain one as well for calls with
    few rows (see `FP32_PLAIN_MAX_ROWS`). No bias: the Llama layers have none.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.plain = weight.detach() if weight.dtype == torch.float32 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and x.numel() <= FP32_PLAIN_MAX_ROWS * self.in_features:
            return F.linear(x, self.plain)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack_linears(model: nn.Module) -> int:
    """Replace every bias-free `nn.Linear` under `model` by a `PackedLinear` (in place);
    return how many were replaced. The model's weights must be final: a later
    `load_state_dict` does not reach the packed copies."""
    num_packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and can_prepack(child.weight):
                setattr(parent, name, PackedLinear(child.weight))
                num_packed += 1
    log.debug("prepacked %d linear layers", num_packed)
    return num_packed
