"""Llama-family decoder in torch: RoPE, RMSNorm, SwiGLU, grouped-query attention.

The model works on a flat batch of tokens `[num_tokens]` drawn from many
sequences at once (prefill chunks and decode tokens mixed). Attention is
delegated to a `PagedAttention` object that the engine binds to the current
batch; it stores each layer's new K/V into KV pages and attends over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.model.config import ModelConfig
from splitserve.model.ops import ModelOps, TorchOps
from splitserve.model.quant import QuantizedWeight, cat_rows
from splitserve.model.rope import RopeAngles, RotaryEmbedding


class PagedAttention(Protocol):
    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q `[T, num_heads, head_dim]`, k/v `[T, num_kv_heads, head_dim]` → `[T, num_heads, head_dim]`."""
        ...


class Linear(nn.Linear):
    """`nn.Linear` without its random init: every weight comes from a checkpoint.
    Created uninitialized on its final device and dtype, a model costs no init and no
    copy; building it on the meta device instead runs torch's Python meta kernels,
    which import torch._dynamo (about 1 s of each engine start)."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """`nn.Embedding` without its random init (see `Linear`)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """One norm's weight and eps; the model applies it through its `ModelOps`
    (`rms_norm` / `add_rms_norm`, fused with the residual add)."""

    def __init__(self, size: int, eps: float, **factory: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, **factory))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, **factory: Any) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Q, K and V share one matmul: on a CPU three small GEMMs cost more than one.
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False,
                               **factory)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False, **factory)

    def forward(
        self,
        x: torch.Tensor,
        angles: RopeAngles,
        attention: PagedAttention,
        ops: ModelOps,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # Q and K are adjacent in each row: one rotation for both
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
        q, k = ops.rope(angles, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads,
                                                     self.head_dim)
        out = attention(self.layer, q, k, v)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, **factory: Any) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False,
                                   **factory)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False,
                                **factory)

    def forward(self, x: torch.Tensor, ops: ModelOps) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, **factory: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.self_attn = Attention(config, layer, **factory)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                                **factory)
        self.mlp = MLP(config, **factory)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        angles: RopeAngles,
        attention: PagedAttention,
        ops: ModelOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous layer's output and the residual stream before it (None: x is
        the embedding) → this layer's MLP output and the residual stream before it. The
        residual add is fused into the next norm; the sums are Hugging Face's
        `residual + h` after each block."""
        norm = self.input_layernorm
        if residual is None:
            h, residual = ops.rms_norm(x, norm.weight, norm.eps), x
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, angles, attention, ops)
        norm = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    """Parameters are named like Hugging Face's `LlamaForCausalLM`, with Q/K/V and
    gate/up fused (see `load_hf_state_dict`). Built on `device` in `dtype` with the
    weights uninitialized until they are loaded."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        factory: dict[str, Any] = {"dtype": dtype, "device": device}
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, **factory)
        self.layers = nn.ModuleList(DecoderLayer(config, i, **factory)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config).to(device)
        # the elementwise steps: torch ops until the loader picks the native ones
        self.ops: ModelOps = TorchOps()

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: PagedAttention,
        between_layers: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """input_ids, positions: int64 `[T]` → final hidden states `[T, hidden_size]`.
        `between_layers()` runs after each layer (the engine's mid-step commands)."""
        x = self.embed_tokens(input_ids)
        angles = self.rope.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, angles, attention, self.ops)
            if between_layers is not None:
                between_layers()
        if residual is None:  # a model without layers (tests)
            return self.ops.rms_norm(x, self.norm.weight, self.norm.eps)
        return self.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden `[N, hidden_size]` → fp32 logits `[N, vocab_size]`."""
        return self.lm_head(hidden).float()

    def fused_weights(self) -> dict[str, list[str]]:
        """Each fused weight (`layers.0.self_attn.qkv_proj.weight`) → the weights stacked
        into it by rows, in order, named as in HF without the `model.` prefix."""
        fused = {}
        for i in range(self.config.num_layers):
            p = f"layers.{i}."
            fused[p + "self_attn.qkv_proj.weight"] = [p + f"self_attn.{n}_proj.weight"
                                                      for n in ("q", "k", "v")]
            fused[p + "mlp.gate_up_proj.weight"] = [p + f"mlp.{n}_proj.weight"
                                                    for n in ("gate", "up")]
        return fused

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in HF `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj.weight`...)."""
        dtype = self.embed_tokens.weight.dtype
        own = {}
        for name, tensor in weights.items():
            key = name.removeprefix("model.")
            own[key] = tensor.to(dtype)
        for name, parts in self.fused_weights().items():
            own[name] = torch.cat([own.pop(part) for part in parts])
        if self.config.tie_word_embeddings:
            own.pop("lm_head.weight", None)
            own["lm_head.weight"] = own["embed_tokens.weight"]
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [m for m in missing if not m.startswith("rope.")]
        if missing or unexpected:
            from splitserve.errors import ModelLoadError

            raise ModelLoadError(f"weights do not match the model: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def quantized_linears(self, quantized: Mapping[str, QuantizedWeight]
                          ) -> dict[str, QuantizedWeight]:
        """The linears' GGUF blocks by module name (`layers.0.self_attn.qkv_proj`), from
        blocks named as the HF weights are (`load_hf_state_dict`); a fused linear has
        them where all its parts are quantized alike."""
        own = {name.removeprefix("model."): q for name, q in quantized.items()}
        for name, parts in self.fused_weights().items():
            fused = cat_rows([own.pop(part, None) for part in parts])
            if fused is not None:
                own[name] = fused
        if self.config.tie_word_embeddings and "embed_tokens.weight" in own:
            own["lm_head.weight"] = own["embed_tokens.weight"]
        return {name.removesuffix(".weight"): q for name, q in own.items()}


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention for one sequence without a cache (tests, references).

    q `[T, H, D]`, k/v `[T, KVH, D]` → `[T, H, D]`.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        is_causal=True, scale=scale,
    )
    return out.transpose(0, 1).to(q.dtype)
