"""The native few-row fp32 linear (native/small_linear.cpp) against plain torch: close to
a float64 matmul and to MKL, the same bits for a row whatever rows share the call, and
used by `PackedLinear` for up to 128 rows (a decode step, a short prefill chunk),
oneDNN's packed weight above; `PanelLinear` (the fp32 lm_head) takes larger calls in
slices of 128 rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.model.config import ModelConfig
from splitserve.model.llama import LlamaModel
from splitserve.model.packed_linear import (
    PackedLinear,
    PanelLinear,
    Panels,
    PlainWeight,
    few_rows_path,
    prepack_linears,
    small_linear_kernel,
)

SMALL = small_linear_kernel()
pytestmark = pytest.mark.skipif(SMALL is None, reason="no AVX-512 here: oneDNN path only")

# (out, in): SmolLM2's qkv, gate_up, down and lm_head-like, and odd sizes (a last panel
# of 16 outputs partly padded, fewer panels than a tile takes, K under one k-block)
SHAPES = [(960, 576), (3072, 576), (576, 1536), (4099, 576), (131, 37), (7, 16), (1, 5)]


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return SMALL.linear(x, SMALL.pack(weight), weight.shape[0])


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
# groups of rows: 1 of 1..8, then 2 of 5/4 (9), of 8 (16), 3 of 6/5 (17), 16 of 8 (128)
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 17, 128])
def test_matches_a_float64_matmul_as_closely_as_mkl(out_features, in_features, rows) -> None:
    weight = _weight(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    reference = x.double() @ weight.double().t()
    ours = _linear(x, weight)
    assert ours.shape == (rows, out_features) and ours.dtype == torch.float32
    mkl_error = (F.linear(x, weight).double() - reference).abs().max().item()
    error = (ours.double() - reference).abs().max().item()
    assert error <= max(2 * mkl_error, 1e-6 * in_features), (error, mkl_error)


def test_a_row_gets_the_same_bits_whatever_rows_share_the_call() -> None:
    weight = _weight(1000, 576)
    panels = SMALL.pack(weight)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([SMALL.linear(x[i:i + 1].contiguous(), panels, 1000) for i in range(40)])
    for rows in (3, 8, 11, 16, 17, 40):
        assert torch.equal(SMALL.linear(x[:rows].contiguous(), panels, 1000), alone[:rows])


def test_refuses_what_it_cannot_compute() -> None:
    panels = SMALL.pack(_weight(20, 32))  # 2 panels: 17..32 outputs
    for x, outputs, what in [
            (torch.randn(129, 32), 20, "rows"), (torch.randn(0, 32), 20, "rows"),
            (torch.randn(2, 31), 20, "columns"), (torch.randn(2, 32).double(), 20, "fp32"),
            (torch.randn(32, 2).t(), 20, "contiguous"), (torch.randn(2, 32), 16, "panels"),
            (torch.randn(2, 32), 33, "panels")]:
        with pytest.raises(RuntimeError, match=what):
            SMALL.linear(x, panels, outputs)
    with pytest.raises(RuntimeError, match="fp32"):
        SMALL.pack(_weight(20, 32).double())


def test_packed_linear_takes_the_kernel_for_a_decode_steps_rows_only() -> None:
    weight = _weight(960, 576)
    layer = PackedLinear(weight, few_rows_path(weight, SMALL))
    assert isinstance(layer.few, Panels) and layer.few.max_rows == SMALL.max_rows == 128
    for shape in [(1, 576), (16, 576), (2, 64, 576)]:  # [..., in] as the model passes it
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        expected = _linear(x.reshape(-1, 576).contiguous(), weight).view(*shape[:-1], 960)
        assert torch.equal(layer(x), expected)
    prefill = torch.randn(129, 576, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(layer(prefill)[:128], _linear(prefill[:128].contiguous(), weight))
    torch.testing.assert_close(layer(prefill), F.linear(prefill, weight), rtol=1e-4, atol=1e-4)
    # without the kernel, MKL's small-M path for up to 3 rows
    plain = PackedLinear(weight, few_rows_path(weight, None))
    assert isinstance(plain.few, PlainWeight) and plain.few.max_rows == 3
    assert torch.equal(plain(prefill[:3]), F.linear(prefill[:3], weight))


def test_panel_linear_slices_large_calls_into_the_same_bits_as_rows_alone() -> None:
    weight = _weight(1000, 576)
    layer = PanelLinear(weight, few_rows_path(weight, SMALL))
    x = torch.randn(300, 576, generator=torch.Generator().manual_seed(5))  # 128 + 128 + 44
    alone = torch.cat([_linear(x[i:i + 1].contiguous(), weight) for i in range(300)])
    assert torch.equal(layer(x), alone)
    assert torch.equal(layer(x.view(3, 100, 576)), alone.view(3, 100, 1000))
    assert torch.equal(layer(x[7:9]), alone[7:9])


@pytest.mark.parametrize("tied", [True, False])
def test_prepack_gives_the_fp32_lm_head_the_panels_alone(tied: bool) -> None:
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tied)
    for dtype, lm_head_type in [(torch.float32, PanelLinear), (torch.bfloat16, PackedLinear)]:
        model = LlamaModel(config, dtype)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for param in model.parameters():  # created empty
                param.copy_(torch.randn(param.shape, generator=generator))
        weight = model.lm_head.weight.detach().clone()
        assert prepack_linears(model, few_rows={"lm_head"}) == 2 * 4 + 1  # qkv, o, gate_up, down; lm_head
        assert type(model.lm_head) is lm_head_type
        assert all(type(m) is PackedLinear for name, m in model.named_modules()
                   if name.startswith("layers.") and isinstance(m, (PackedLinear, PanelLinear)))
        # bf16 keeps only oneDNN's packed weight
        assert all((m.few is None) == (dtype == torch.bfloat16) for m in model.modules()
                   if isinstance(m, PackedLinear))
        hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
        torch.testing.assert_close(model.compute_logits(hidden), F.linear(hidden, weight).float(),
                                   rtol=2e-2, atol=2e-2)
