"""The few-row kernel from GGUF blocks (`small_linear.qlinear`, model/quant.py) against
the fp32 kernel on the dequantized weight: the same bits, for Q4_1 and Q8_0 blocks made
by the `gguf` package, at every row count the kernel takes; `prepack_linears` and the
loader give the default model's 121 linears their blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitserve.model.dequant import dequantize
from splitserve.model.gguf_loader import GGUFModel
from splitserve.model.loader import default_model_path
from splitserve.model.packed_linear import (
    PackedLinear,
    PanelLinear,
    Panels,
    QuantPanels,
    few_rows_path,
    small_linear_kernel,
)
from splitserve.model.quant import KINDS, QuantizedWeight, cat_rows, qpack

SMALL = small_linear_kernel()
pytestmark = pytest.mark.skipif(SMALL is None, reason="no AVX-512 here: oneDNN path only")
gguf = pytest.importorskip("gguf")


def _quantized(kind: str, out_features: int, in_features: int, seed: int = 0
               ) -> tuple[QuantizedWeight, torch.Tensor]:
    """Blocks of a random weight as llama.cpp quantizes it, and their fp32 values."""
    weight = np.random.default_rng(seed).normal(0, 0.05, (out_features, in_features))
    raw = gguf.quants.quantize(weight.astype(np.float32), gguf.GGMLQuantizationType[kind])
    values = dequantize(kind, raw, (out_features, in_features))
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(out_features, -1))
    return QuantizedWeight(kind, blocks), torch.from_numpy(np.array(values, dtype=np.float32))


def _x(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))


# (out, in): SmolLM2's qkv and down, a last panel partly padded with a k-block and a
# half, one block of 32 inputs, fewer outputs than a panel
@pytest.mark.parametrize(("out_features", "in_features"),
                         [(960, 576), (576, 1536), (131, 96), (20, 32), (7, 64)])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_same_bits_as_the_fp32_kernel_on_the_dequantized_weight(kind, out_features,
                                                                in_features) -> None:
    quantized, weight = _quantized(kind, out_features, in_features)
    ours = QuantPanels(SMALL, qpack(quantized), KINDS[kind][0], out_features)
    fp32 = Panels(SMALL, SMALL.pack(weight), out_features)
    # groups of rows: 1 of 1..8, then 2 of 5/4 (9), 3 of 6/5 (17), 16 of 8 (128)
    for rows in (1, 3, 8, 9, 17, 64, 128):
        x = _x(rows, in_features)
        assert torch.equal(ours(x), fp32(x)), rows


def test_refuses_what_it_cannot_compute() -> None:
    quantized, _ = _quantized("Q4_1", 20, 64)
    qpanels = qpack(quantized)  # [2 panels, 2 blocks, 320 bytes]
    for args, what in [((_x(129, 64), qpanels, 0, 20), "rows"),
                       ((_x(2, 32), qpanels, 0, 20), "columns"),
                       ((_x(2, 64), qpanels, 1, 20), "qpanels"),  # Q8_0's 544 bytes
                       ((_x(2, 64), qpanels, 2, 20), "kind"),
                       ((_x(2, 64), qpanels, 0, 33), "panels"),
                       ((_x(2, 64).double(), qpanels, 0, 20), "fp32")]:
        with pytest.raises(RuntimeError, match=what):
            SMALL.qlinear(*args)
    with pytest.raises(ValueError, match="not a kernel quantization"):
        QuantizedWeight("Q5_K", quantized.blocks)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight("Q4_1", quantized.blocks[:, :30])


def test_fused_rows_are_quantized_alike_or_not_at_all() -> None:
    q, _ = _quantized("Q4_1", 16, 64)
    k, _ = _quantized("Q4_1", 8, 64, seed=1)
    fused = cat_rows([q, k])
    assert fused is not None and fused.shape == (24, 64)
    assert torch.equal(fused.blocks, torch.cat([q.blocks, k.blocks]))
    assert cat_rows([q, _quantized("Q8_0", 8, 64)[0]]) is None
    assert cat_rows([q, None]) is None
    assert cat_rows([q, _quantized("Q4_1", 8, 96)[0]]) is None  # other inputs


def test_a_weight_takes_its_blocks_only_when_they_are_its_shape() -> None:
    quantized, weight = _quantized("Q4_1", 48, 64)
    assert isinstance(few_rows_path(weight, SMALL, quantized), QuantPanels)
    assert isinstance(few_rows_path(weight[:32], SMALL, quantized), Panels)


def test_the_default_model_reads_its_linears_from_the_files_blocks(smollm) -> None:
    model = smollm.model
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (PackedLinear, PanelLinear))}
    assert len(layers) == 30 * 4 + 1
    assert all(isinstance(m.few, QuantPanels) for m in layers.values())
    assert {m.few.kind for m in layers.values()} == {KINDS["Q4_1"][0], KINDS["Q8_0"][0]}
    # the same bits as the fp32 kernel on the weights the model computes with elsewhere:
    # the lm_head is the (tied) embedding; a layer's fused qkv from the file's blocks
    lm_head = Panels(SMALL, SMALL.pack(model.embed_tokens.weight.detach()), 49152)
    x = _x(5, 576)
    assert torch.equal(layers["lm_head"].few(x), lm_head(x))
    blocks = dict(GGUFModel(default_model_path()).quantized())
    parts = [blocks[f"model.layers.3.self_attn.{n}_proj.weight"] for n in "qkv"]
    qkv = torch.cat([torch.from_numpy(dequantize(p.kind, p.blocks.numpy(), p.shape)) for p in parts])
    assert torch.equal(layers["layers.3.self_attn.qkv_proj"].few(x),
                       Panels(SMALL, SMALL.pack(qkv), qkv.shape[0])(x))
