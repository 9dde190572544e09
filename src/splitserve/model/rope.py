"""Rotary position embedding (rotate-half layout, as in Hugging Face Llama)."""

from __future__ import annotations

import math

import torch
from torch import nn

from splitserve.model.config import ModelConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling.kind == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.kind == "llama3":
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are divided by the factor, short ones kept, and the band
    # between interpolated smoothly (Llama 3.1 scheme).
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# cos and sin `[T, 1, head_dim]` of a forward pass's positions, in the model's dtype
RopeAngles = tuple[torch.Tensor, torch.Tensor]


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin `[max_positions, head_dim]` in fp32."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        c = self.config
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        positions = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        emb = torch.outer(positions, inv_freq).repeat(1, 2)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeAngles:
        """cos and sin `[T, 1, D]` of `positions` `[T]`, rounded to `dtype`: computed once
        per forward pass and shared by all layers."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def apply_rope(angles: RopeAngles, x: torch.Tensor) -> torch.Tensor:
    """x `[T, heads, D]` (Q and K heads together) rotated in its dtype with cos/sin
    rounded to it, as Hugging Face's Llama does (needed for bf16 greedy parity)."""
    cos, sin = angles
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
