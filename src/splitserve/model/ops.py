"""The Llama layer's elementwise steps: torch ops anywhere, fused native ops on a CPU.

`TorchOps` is the reference: the ops and roundings of Hugging Face's Llama (RMSNorm
in fp32 scaled in the model dtype, RoPE and SiLU·up in the model dtype). `NativeOps`
(`native/model_ops.cpp`) does each step in one pass instead of 4-10 torch ops: on the
2-core box those small ops, one dispatch and one sweep over memory each, took a
quarter of a bf16 engine step. It rounds where the torch path rounds, so both give the
same bits (tests/unit/test_model_ops.py); `model_ops` picks it for a CPU model when it
can be built and checks it against `TorchOps` once before handing it out.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from splitserve.model.rope import RopeAngles, apply_rope
from splitserve.native import load_extension

log = logging.getLogger(__name__)


class ModelOps(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x `[T, H]` → RMSNorm(x) · weight `[T, H]`."""
        ...

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual) · weight, x + residual); may update `residual` in place."""
        ...

    def rope(self, angles: RopeAngles, qk: torch.Tensor) -> torch.Tensor:
        """qk `[T, heads, D]` (Q and K heads, rows may be strided) rotated, contiguous."""
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up `[T, 2I]` → SiLU(gate) · up `[T, I]`."""
        ...


class TorchOps:
    """Plain torch: any device, and the reference the native ops are held to."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # normalize in fp32 like the reference implementation, then scale in x's dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def rope(self, angles: RopeAngles, qk: torch.Tensor) -> torch.Tensor:
        return apply_rope(angles, qk)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
        return F.silu(gate) * up


class NativeOps:
    """The fused C++ ops. `lanes`: the vector width ATen's CPU sum adds with (RMSNorm's
    mean of squares is summed in its order); `vector_bytes`: the width of ATen's
    elementwise kernels (SiLU takes SLEEF's exp over the same blocks)."""

    def __init__(self, module: ModuleType, lanes: int, vector_bytes: int) -> None:
        self._m = module
        self.lanes = lanes
        self.vector_bytes = vector_bytes

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out: torch.Tensor = self._m.rms_norm(x, None, weight, eps, self.lanes)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self._m.rms_norm(x, residual, weight, eps, self.lanes), residual

    def rope(self, angles: RopeAngles, qk: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._m.rope(qk, angles[0], angles[1])
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._m.silu_mul(gate_up, self.vector_bytes)
        return out


def model_ops(device: torch.device) -> ModelOps:
    """The fused native ops for a CPU model where they build, else the torch ops."""
    if device.type != "cpu":
        return TorchOps()
    module = load_extension("model_ops")
    if module is None:
        return TorchOps()
    vector_bytes = 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32
    lanes = _sum_lanes(module, vector_bytes)
    return NativeOps(module, lanes, vector_bytes)


def _sum_lanes(module: ModuleType, vector_bytes: int) -> int:
    """The lane count with which RMSNorm matches the torch path bit for bit here (torch
    2.13 sums with AVX2's 8 lanes on an AVX-512 machine). None matching: 8, and the
    norm may differ from the torch path by a rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 600, generator=gen)
    weight = torch.rand(600, generator=gen) + 0.5
    reference = TorchOps().rms_norm(x, weight, 1e-5)
    for lanes in (8, 16, 4):
        if torch.equal(NativeOps(module, lanes, vector_bytes).rms_norm(x, weight, 1e-5),
                       reference):
            return lanes
    log.warning("native RMSNorm sums in another order than torch here: it may differ from "
                "the torch path by a rounding")
    return 8
