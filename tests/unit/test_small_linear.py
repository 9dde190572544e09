"""The native few-row fp32 linear (native/small_linear.cpp) against plain torch: close to
a float64 matmul and to MKL, the same bits for a row whatever rows share the call, and
used by `PackedLinear` for a decode step's rows (1..16), oneDNN's packed weight above."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitserve.model.packed_linear import PackedLinear, small_linear_kernel

SMALL = small_linear_kernel()
pytestmark = pytest.mark.skipif(SMALL is None, reason="no AVX-512 here: oneDNN path only")

# (out, in): SmolLM2's qkv, gate_up, down and lm_head-like, and odd sizes (a masked tail
# of K, an odd row count for the pairs of weight rows)
SHAPES = [(960, 576), (3072, 576), (576, 1536), (4099, 576), (131, 37), (7, 16), (1, 5)]


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16])
def test_matches_a_float64_matmul_as_closely_as_mkl(out_features, in_features, rows) -> None:
    weight = _weight(out_features, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    reference = x.double() @ weight.double().t()
    ours = SMALL.linear(x, weight)
    assert ours.shape == (rows, out_features) and ours.dtype == torch.float32
    mkl_error = (F.linear(x, weight).double() - reference).abs().max().item()
    error = (ours.double() - reference).abs().max().item()
    assert error <= max(2 * mkl_error, 1e-6 * in_features), (error, mkl_error)


def test_a_row_gets_the_same_bits_whatever_rows_share_the_call() -> None:
    weight = _weight(1000, 576)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([SMALL.linear(x[i:i + 1].contiguous(), weight) for i in range(16)])
    for rows in (3, 8, 11, 16):
        assert torch.equal(SMALL.linear(x[:rows].contiguous(), weight), alone[:rows])


def test_refuses_what_it_cannot_compute() -> None:
    weight = _weight(8, 32)
    for x, what in [(torch.randn(17, 32), "rows"), (torch.randn(0, 32), "rows"),
                    (torch.randn(2, 31), "columns"), (torch.randn(2, 32).double(), "fp32"),
                    (torch.randn(32, 2).t(), "contiguous")]:
        with pytest.raises(RuntimeError, match=what):
            SMALL.linear(x, weight)


def test_packed_linear_takes_the_kernel_for_a_decode_steps_rows_only() -> None:
    weight = _weight(960, 576)
    layer = PackedLinear(weight, SMALL)
    assert layer.small_max_rows == SMALL.max_rows == 16
    for shape in [(1, 576), (16, 576), (2, 8, 576)]:  # [..., in] as the model passes it
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
        expected = SMALL.linear(x.reshape(-1, 576).contiguous(), weight).view(*shape[:-1], 960)
        assert torch.equal(layer(x), expected)
    prefill = torch.randn(17, 576, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(layer(prefill)[:16], SMALL.linear(prefill[:16].contiguous(), weight))
    torch.testing.assert_close(layer(prefill), F.linear(prefill, weight), rtol=1e-4, atol=1e-4)
    # bf16 keeps only oneDNN's packed weight
    assert PackedLinear(weight.bfloat16(), SMALL).small is None
