"""The fused native layer steps against the torch ops they replace: the same bits."""

from __future__ import annotations

import pytest
import torch

from splitserve.model.ops import NativeOps, TorchOps, model_ops

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def native() -> NativeOps:
    ops = model_ops(torch.device("cpu"))
    if not isinstance(ops, NativeOps):
        pytest.skip("the native ops cannot be built here (no C++ compiler?): torch ops only")
    return ops


def _randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 576), (16, 576), (300, 576), (5, 48),
                                                (3, 7), (2, 2048), (4, 100), (3, 2565),
                                                (2, 16384)])
def test_rms_norm_same_bits(native: NativeOps, dtype: torch.dtype, tokens: int,
                            hidden: int) -> None:
    torch.manual_seed(tokens * hidden)
    x = _randn(tokens, hidden, dtype=dtype, scale=3.0)
    residual = _randn(tokens, hidden, dtype=dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    ref = TorchOps()
    assert torch.equal(native.rms_norm(x, weight, 1e-5), ref.rms_norm(x, weight, 1e-5))
    want_out, want_sum = ref.add_rms_norm(x, residual, weight, 1e-6)
    own = residual.clone()
    got_out, got_sum = native.add_rms_norm(x, own, weight, 1e-6)
    assert got_sum is own  # the residual stream is updated in place
    assert torch.equal(got_sum, want_sum)
    assert torch.equal(got_out, want_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(37, 12, 64), (1, 4, 128),
                                                           (9, 3, 6)])
def test_rope_same_bits_on_a_strided_view(native: NativeOps, dtype: torch.dtype, tokens: int,
                                          heads: int, head_dim: int) -> None:
    torch.manual_seed(heads)
    qkv = _randn(tokens, (heads + 3) * head_dim, dtype=dtype)
    qk = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)  # rows strided
    angle = (torch.randn(tokens, 1, head_dim // 2) * 5).repeat(1, 1, 2)
    angles = (angle.cos().to(dtype), angle.sin().to(dtype))
    got = native.rope(angles, qk)
    assert got.is_contiguous()
    assert torch.equal(got, TorchOps().rope(angles, qk))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (16, 1536), (200, 1536), (3, 40),
                                               (5, 17), (2, 100)])
def test_silu_mul_same_bits(native: NativeOps, dtype: torch.dtype, tokens: int,
                            inter: int) -> None:
    torch.manual_seed(inter)
    gate_up = _randn(tokens, 2 * inter, dtype=dtype, scale=4.0)
    assert torch.equal(native.silu_mul(gate_up), TorchOps().silu_mul(gate_up))


def test_bad_shapes_are_refused_not_crashed(native: NativeOps) -> None:
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight"):
        native.rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="residual"):
        native.add_rms_norm(x, torch.randn(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        native.rms_norm(x.t(), torch.ones(4), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        native.silu_mul(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="cos and sin"):
        native.rope((torch.ones(4, 1, 8), torch.ones(3, 1, 8)), torch.randn(4, 2, 8))


def test_cpu_models_get_the_native_ops(native: NativeOps, tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(tiny_loaded.model.ops, NativeOps)
    assert isinstance(model_ops(torch.device("meta")), TorchOps)
