"""Weights kept as a GGUF file quantized them (Q4_1, Q8_0), for the few-row kernel.

The default model's file stores its linears in Q4_1 (20 bytes per 32 weights) and its
embedding, which is also its lm_head, in Q8_0 (34 bytes per 32). The loader dequantizes
them to fp32 for the model; a decode step's linears, which read every weight once per
step, are bound by reading those fp32 weights from memory (540 MB for SmolLM2-135M).
Kept quantized as well (96 MB), they are dequantized into L1 block by block inside
`small_linear.qlinear`, and the outputs have the same bits as the fp32 kernel's on the
dequantized weights: every weight d × q + m comes out exact (see the kernel).

`QuantizedWeight` is a weight's blocks as stored (rows of blocks, in the fp32 weight's
row order); `qpack` lays them out for the kernel: per panel of 16 output rows and per
block of 32 inputs, the 16 rows' scales, then their quants interleaved row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 32  # weights per GGUF block
LANES = 16  # output rows per kernel panel
# GGUF type -> (the kernel's kind, bytes per block of 32 weights)
KINDS = {"Q4_1": (0, 20), "Q8_0": (1, 34)}


@dataclass(frozen=True)
class QuantizedWeight:
    """A `[out, in]` weight's GGUF blocks: uint8 `[out, in / 32 × block bytes]`."""

    kind: str
    blocks: torch.Tensor

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.kind}: not a kernel quantization ({', '.join(KINDS)})")
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 2 or (
                self.blocks.shape[1] % KINDS[self.kind][1]):
            raise ValueError(f"{self.kind} blocks must be uint8 [out, in / 32 × "
                             f"{KINDS[self.kind][1]}], got {tuple(self.blocks.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] // KINDS[self.kind][1] * BLOCK


def cat_rows(parts: Sequence[QuantizedWeight | None]) -> QuantizedWeight | None:
    """The weights stacked by rows (a fused projection), or None unless every part is
    quantized the same way with the same inputs."""
    first = parts[0]
    if first is None or any(p is None or p.kind != first.kind or p.shape[1] != first.shape[1]
                            for p in parts):
        return None
    return QuantizedWeight(first.kind, torch.cat([p.blocks for p in parts if p is not None]))


def qpack(weight: QuantizedWeight) -> torch.Tensor:
    """The kernel's layout, uint8 `[ceil(out / 16), in / 32, panel block bytes]`; rows
    past `out` are zero (scale 0: weights 0)."""
    (out, inp), size = weight.shape, KINDS[weight.kind][1]
    panels, blocks = -(-out // LANES), inp // BLOCK
    raw = torch.zeros(panels * LANES, blocks, size, dtype=torch.uint8)
    raw[:out] = weight.blocks.view(out, blocks, size)
    raw = raw.view(panels, LANES, blocks, size).transpose(1, 2)  # [P, blocks, 16 rows, size]
    scales = 4 if weight.kind == "Q4_1" else 2  # d (and m), fp16 each
    parts = [raw[..., i:i + 2].reshape(panels, blocks, 2 * LANES) for i in range(0, scales, 2)]
    quants = raw[..., scales:].transpose(2, 3)  # [P, blocks, bytes, 16 rows]
    parts.append(quants.reshape(panels, blocks, (size - scales) * LANES))
    return torch.cat(parts, dim=-1).contiguous()
