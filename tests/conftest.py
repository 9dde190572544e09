"""Shared fixtures: a tiny random-weight Llama for speed, SmolLM2 where real weights matter."""

from __future__ import annotations

import os

import torch

# Triton decides compiled vs interpreted once, at its first import in the process:
# without a GPU the kernel tests (and the engine's triton backend test) need the
# interpreter, so set it before anything can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable
from dataclasses import replace

import pytest

from splitserve.config.schema import EngineConfig
from splitserve.engine.llm_engine import Engine
from splitserve.model.config import ModelConfig
from splitserve.model.loader import (
    LoadedModel,
    build_model,
    default_model_path,
    load_model,
)

TINY = ModelConfig(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=6,
    num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
    tie_word_embeddings=False, eos_token_ids=(),
)


def tiny_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face Llama names; std chosen so logits are well spread."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    w = {"model.embed_tokens.weight": rnd(config.vocab_size, h, std=1.0),
         "model.norm.weight": 1 + rnd(h, std=0.1),
         "lm_head.weight": rnd(config.vocab_size, h, std=0.3)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        w[p + "input_layernorm.weight"] = 1 + rnd(h, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(h, std=0.1)
        w[p + "self_attn.q_proj.weight"] = rnd(config.num_heads * d, h, std=0.3)
        w[p + "self_attn.k_proj.weight"] = rnd(config.num_kv_heads * d, h, std=0.3)
        w[p + "self_attn.v_proj.weight"] = rnd(config.num_kv_heads * d, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, config.num_heads * d)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
    return w


@pytest.fixture(scope="session")
def tiny_loaded() -> LoadedModel:
    model = build_model(TINY, tiny_weights(TINY))
    return LoadedModel(model, None, TINY, "tiny", "tiny-random")


@pytest.fixture
def tiny_engine(tiny_loaded: LoadedModel) -> Callable[..., Engine]:
    def make(**overrides: object) -> Engine:
        cfg = replace(EngineConfig(num_pages=128, page_size=4, max_num_batched_tokens=64),
                      **overrides)  # type: ignore[arg-type]
        return Engine(tiny_loaded, cfg)

    return make


@pytest.fixture(scope="session")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(dtype=torch.float32)


@pytest.fixture
def smollm_engine(smollm: LoadedModel) -> Callable[..., Engine]:
    def make(**overrides: object) -> Engine:
        cfg = replace(EngineConfig(num_pages=256), **overrides)  # type: ignore[arg-type]
        return Engine(smollm, cfg)

    return make


@pytest.fixture(scope="session")
def hf_smollm():  # type: ignore[no-untyped-def]
    """Hugging Face transformers loading the same GGUF file (the reference)."""
    transformers = pytest.importorskip("transformers")
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-requests", type=int, default=400,
                     help="mutated requests of tests/integration/test_grpc_fuzz.py "
                     "(the issue's full run: 10000)")
