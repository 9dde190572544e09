"""Read a llama.cpp GGUF file: hyper-parameters, dequantized weights, tokenizer, chat template."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitserve.errors import ModelLoadError
from splitserve.model.config import ModelConfig, RopeScaling
from splitserve.model.dequant import dequantize
from splitserve.model.quant import KINDS, QuantizedWeight
from splitserve.model.tokenizer import TokenizerSpec, byte_level_bpe

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GGUF tensor name (after `blk.N.`) → Hugging Face name (after `model.layers.N.`)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFModel:
    """A GGUF file opened for reading (memory-mapped)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(str(path))
        except Exception as exc:  # the gguf package raises bare ValueError/KeyError
            raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
        self.path = path
        arch = self._get("general.architecture")
        if arch != "llama":
            raise ModelLoadError(f"{path}: architecture {arch!r} is not supported (need 'llama')")
        self.config = self._read_config()

    def _get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _read_config(self) -> ModelConfig:
        g = self._get
        hidden = int(g("llama.embedding_length"))
        num_heads = int(g("llama.attention.head_count"))
        head_dim = int(g("llama.rope.dimension_count", hidden // num_heads))
        names = {t.name for t in self._reader.tensors}
        vocab = g("llama.vocab_size") or len(self._reader.fields["tokenizer.ggml.tokens"].data)
        eos = g("tokenizer.ggml.eos_token_id")
        scaling_type = g("llama.rope.scaling.type", "none")
        scaling = RopeScaling(
            kind="none" if scaling_type in (None, "none") else str(scaling_type),
            factor=float(g("llama.rope.scaling.factor", 1.0)),
        )
        if scaling.kind not in ("none", "linear"):
            raise ModelLoadError(f"{self.path}: rope scaling {scaling.kind!r} is not supported")
        return ModelConfig(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(g("llama.feed_forward_length")),
            num_layers=int(g("llama.block_count")),
            num_heads=num_heads,
            num_kv_heads=int(g("llama.attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            rms_norm_eps=float(g("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(g("llama.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            bos_token_id=g("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    @property
    def num_tensors(self) -> int:
        return len(self._reader.tensors)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (Hugging Face name, float32 tensor) with Q/K un-permuted."""
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            shape = tuple(reversed([int(x) for x in t.shape]))
            weights = self._hf_rows(name, dequantize(t.tensor_type.name, t.data, shape))
            yield name, torch.from_numpy(np.array(weights, dtype=np.float32))

    def quantized(self) -> Iterator[tuple[str, QuantizedWeight]]:
        """Yield (Hugging Face name, GGUF blocks) of the 2-D tensors stored in a
        quantization the few-row kernel reads (`quant.KINDS`), rows in the order
        `tensors` gives them."""
        for t in self._reader.tensors:
            kind = t.tensor_type.name
            if kind not in KINDS or len(t.shape) != 2:
                continue
            name = _hf_name(t.name)
            blocks = np.asarray(t.data, dtype=np.uint8).reshape(int(t.shape[1]), -1)
            yield name, QuantizedWeight(
                kind, torch.from_numpy(np.array(self._hf_rows(name, blocks), dtype=np.uint8)))

    def _hf_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """A weight's rows (values or blocks) in Hugging Face's order: Q/K un-permuted."""
        if name.endswith("self_attn.q_proj.weight"):
            return unpermute_rope(rows, self.config.num_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return unpermute_rope(rows, self.config.num_kv_heads)
        return rows

    def tokenizer_spec(self) -> TokenizerSpec:
        model = self._get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(f"{self.path}: tokenizer {model!r} is not supported "
                                 "(need byte-level BPE, 'gpt2')")
        tokens = list(self._get("tokenizer.ggml.tokens"))
        merges = list(self._get("tokenizer.ggml.merges"))
        types = list(self._get("tokenizer.ggml.token_type", [1] * len(tokens)))
        special = [i for i, t in enumerate(types)
                   if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)]
        return TokenizerSpec(
            backend_json=byte_level_bpe(tokens, merges, special),
            bos_token_id=self.config.bos_token_id,
            eos_token_ids=self.config.eos_token_ids,
            chat_template=self._get("tokenizer.chat_template"),
            add_bos=bool(self._get("tokenizer.ggml.add_bos_token", False)),
        )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp stores each head's rows with the two rotary halves interleaved
    (pairs (0, d/2), (1, d/2+1), ...) for its adjacent-pair RoPE; the model here
    rotates halves, as Hugging Face does, so the rows go back to halves order.
    """
    rows = weights.shape[0]
    head_dim = rows // num_heads
    return (
        weights.reshape(num_heads, head_dim // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
