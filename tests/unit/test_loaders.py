"""Dequantization, GGUF un-permutation, the converted-weights cache and HF directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from splitserve.errors import ModelLoadError
from splitserve.model.dequant import dequantize
from splitserve.model.gguf_loader import unpermute_rope
from splitserve.model.llama import dense_causal_attention
from splitserve.model.loader import MAX_CACHE_ENTRIES, load_model
from splitserve.model.packed_linear import QuantPanels, small_linear_kernel


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16", "F32"])
def test_dequantize_matches_gguf_reference(type_name: str) -> None:
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(7, 96)).astype(np.float32)
    raw = gguf.quants.quantize(weights, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    got = dequantize(type_name, raw, (7, 96))
    np.testing.assert_array_equal(got, expected)
    if type_name != "F32":
        assert np.abs(got - weights).max() < 0.5  # it is an approximation of the input


def test_unsupported_quantization_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="GGUF tensor type Q5_K is not supported"):
        dequantize("Q5_K", np.zeros(10, dtype=np.uint8), (10,))


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    num_heads, head_dim, hidden = 3, 8, 5
    w = np.arange(num_heads * head_dim * hidden, dtype=np.float32).reshape(-1, hidden)
    # llama.cpp's convert script: interleave each head's two rotary halves
    permuted = (w.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2)
                .reshape(w.shape))
    np.testing.assert_array_equal(unpermute_rope(permuted, num_heads), w)


def test_converted_weights_cache_reloads_identically_and_fast(tmp_path) -> None:
    # older conversions (another checkout, a reinstalled package), least recent first
    stale = [tmp_path / f"old{i}" for i in range(MAX_CACHE_ENTRIES + 1)]
    for age, entry in enumerate(reversed(stale), start=1):
        entry.mkdir()
        (entry / "weights.safetensors").write_bytes(b"old")
        (entry / "meta.json").write_text("{}")
        os.utime(entry / "meta.json", (time.time() - 3600 * age,) * 2)
    (tmp_path / "native").mkdir()  # not a converted model: never pruned
    t0 = time.perf_counter()
    first = load_model(cache_dir=tmp_path)
    cold_s = time.perf_counter() - t0
    [written] = [p.parent for p in tmp_path.glob("*/meta.json") if p.parent not in stale]
    # the new entry and the most recent older ones, MAX_CACHE_ENTRIES in all
    assert sorted(tmp_path.iterdir()) == sorted(
        [written, tmp_path / "native", *stale[-(MAX_CACHE_ENTRIES - 1):]])
    t0 = time.perf_counter()
    second = load_model(cache_dir=tmp_path)
    warm_s = time.perf_counter() - t0
    assert len(list(tmp_path.glob("*/weights.safetensors"))) == MAX_CACHE_ENTRIES
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the linears' GGUF blocks (the few-row path) come back from the cache too
    few = [[m.few.qpanels for m in loaded.model.modules() if isinstance(getattr(m, "few", None),
                                                                         QuantPanels)]
           for loaded in (first, second)]
    assert len(few[0]) == len(few[1]) == (121 if small_linear_kernel() is not None else 0)
    assert all(torch.equal(a, b) for a, b in zip(*few))
    assert first.fingerprint == second.fingerprint
    assert warm_s < cold_s  # no hard timing bound in tests: benchmarks measure speed


def test_corrupt_cache_is_rebuilt(tmp_path) -> None:
    load_model(cache_dir=tmp_path)
    [meta] = tmp_path.glob("*/meta.json")
    meta.write_text("{not json")
    again = load_model(cache_dir=tmp_path)
    assert again.config.num_layers == 30
    assert json.loads(meta.read_text())["config"]["num_layers"] == 30


def test_missing_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(bad, cache_dir=tmp_path)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "llama3", "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 64}])
def test_hf_directory_matches_transformers(tmp_path, smollm, rope_scaling) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=50000.0, rope_scaling=rope_scaling, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "tokenizer.json").write_text(smollm.tokenizer.spec.backend_json)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    ours = load_model(tmp_path)
    ids = torch.randint(0, 49152, (200,))
    scale = ours.config.head_dim**-0.5
    hidden = ours.model(ids, torch.arange(200),
                        lambda layer, q, k, v: dense_causal_attention(q, k, v, scale))
    with torch.inference_mode():
        expected = hf(ids[None]).logits[0]
    torch.testing.assert_close(ours.model.compute_logits(hidden), expected, atol=1e-4, rtol=1e-4)
    assert ours.tokenizer.encode("hello world") == smollm.tokenizer.encode("hello world")
    assert ours.config.eos_token_ids == (2,)


def test_hf_directory_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt_neox' is not supported"):
        load_model(tmp_path)


def test_building_a_model_does_not_import_dynamo() -> None:
    # torch._dynamo's import is ~1 s of an engine's start; the meta device's Python
    # kernels pulled it in. A fresh interpreter, since this one may have it already.
    code = ("import sys\n"
            "from conftest import TINY, tiny_weights\n"
            "from splitserve.model.loader import build_model\n"
            "build_model(TINY, tiny_weights(TINY))\n"
            "print('torch._dynamo' in sys.modules)\n")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=tests_dir, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "False"
