"""The native decode attention against the plain-torch path it replaces (KV on CPU)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import DecodeGroup, TorchPagedAttention
from splitserve.engine.kv_pool import KVPool, PageGeometry
from splitserve.engine.native_attention import load_paged_decode


@pytest.fixture(scope="module")
def paged_decode():  # type: ignore[no-untyped-def]
    op = load_paged_decode()
    if op is None:
        pytest.skip("the native op cannot be built here (no C++ compiler?): torch path only")
    return op


def _group(tables: torch.Tensor, lens: list[int], page_size: int) -> DecodeGroup:
    seq_lens = torch.tensor(lens)
    num_keys = tables.shape[1] * page_size
    mask = (torch.arange(num_keys)[None, :] < seq_lens[:, None])[:, None, None, :]
    return DecodeGroup(torch.arange(len(lens)), tables, seq_lens, tables.flatten(), num_keys,
                       mask)


@pytest.mark.parametrize(("page_size", "num_heads", "num_kv_heads", "head_dim"),
                         [(4, 6, 2, 16), (16, 9, 3, 64), (5, 7, 7, 24), (3, 4, 1, 8),
                          # compiled head and group sizes (64/128 x 1, 2, 3, 4, 8), one not
                          (16, 4, 4, 64), (16, 32, 8, 128), (4, 16, 2, 128), (8, 10, 2, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_matches_torch_path(paged_decode, page_size, num_heads, num_kv_heads,
                                          head_dim, dtype) -> None:
    g = torch.Generator().manual_seed(page_size * 100 + head_dim)
    geometry = PageGeometry(page_size, 3, num_kv_heads, head_dim, dtype)
    pool = KVPool(geometry, 41)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g).to(dtype))
    lens = [1, page_size, page_size + 1, 5 * page_size - 2, 3]  # partial last pages too
    width = max(-(-n // page_size) for n in lens)
    tables = torch.randperm(41, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    reference = TorchPagedAttention(pool, head_dim**-0.5, native=False)
    for layer in range(3):
        ref = reference.decode(layer, q.float() if dtype == torch.bfloat16 else q,
                               _group(tables, lens, page_size))
        got = paged_decode(q, pool.layer_view(layer), tables, torch.tensor(lens),
                           head_dim**-0.5)
        assert got.dtype == dtype and got.shape == q.shape
        # bf16: the output's one rounding (1 ulp apart where the two fp32 values straddle
        # a rounding boundary)
        rtol = 1e-5 if dtype == torch.float32 else 2.0**-7
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=rtol)


def test_engine_attention_uses_native_decode(paged_decode) -> None:
    pool = KVPool(PageGeometry(4, 1, 2, 8, torch.float32), 4)
    assert TorchPagedAttention(pool, 1.0)._native_decode is paged_decode
    bf16_pool = KVPool(PageGeometry(4, 1, 2, 8, torch.bfloat16), 4)
    assert TorchPagedAttention(bf16_pool, 1.0)._native_decode is paged_decode


def test_bf16_decode_of_one_length_stays_on_sdpa(paged_decode) -> None:
    """bf16: sequences of different lengths go to the native op; of one length (a lone
    one above all) to unmasked SDPA, bit for bit the torch path (transformers' roundings)."""
    g = torch.Generator().manual_seed(7)
    pool = KVPool(PageGeometry(4, 1, 2, 16, torch.bfloat16), 12)
    pool.tensor.copy_(torch.randn(pool.tensor.shape, generator=g).to(torch.bfloat16))
    attention = TorchPagedAttention(pool, 0.25)
    calls = []
    attention._native_decode = lambda *args: calls.append(args) or paged_decode(*args)
    torch_only = TorchPagedAttention(pool, 0.25, native=False)
    q = torch.randn(2, 6, 16, generator=g).to(torch.bfloat16)
    tables = torch.tensor([[3, 7, 1], [5, 0, 9]])
    same = _group(tables, [10, 10], 4)
    same = DecodeGroup(same.rows, tables, same.seq_lens, same.page_ids, 10, None)
    assert torch.equal(attention.decode(0, q, same), torch_only.decode(0, q, same))
    assert calls == []
    attention.decode(0, q, _group(tables, [10, 7], 4))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kv_store_matches_torch_path(paged_decode, dtype: torch.dtype) -> None:
    """A step's K/V, handed over as strided views into the QKV output like the model
    does, land in the same pool rows as the torch path's index_copy_ puts them."""
    from splitserve.engine.attention import BatchLayout

    g = torch.Generator().manual_seed(3)
    geometry = PageGeometry(4, 2, 2, 8, dtype)
    pools = [KVPool(geometry, 6), KVPool(geometry, 6)]
    native, reference = TorchPagedAttention(pools[0], 1.0), TorchPagedAttention(pools[1], 1.0,
                                                                                 native=False)
    assert native._native_store is not None
    slots = torch.tensor([5, 6, 7, 8, 21, 2, 13])  # page*4 + offset, in no order
    layout = BatchLayout(slot_mapping=slots, kv_rows=native.kv_rows(slots), decode=[],
                         prefill=[])
    qkv = torch.randn(7, 6 * 8, generator=g).to(dtype)  # 2 Q heads, 2 K, 2 V
    k = qkv[:, 16:32].view(7, 2, 8)
    v = qkv[:, 32:].view(7, 2, 8)
    for layer in (0, 1):
        native.store_kv(layer, k, v, layout)
        reference.store_kv(layer, k, v, layout)
    assert torch.equal(pools[0].tensor, pools[1].tensor)
    assert pools[0].tensor.abs().sum() > 0
    bad = BatchLayout(slot_mapping=slots, kv_rows=layout.kv_rows + 10_000, decode=[],
                      prefill=[])
    with pytest.raises(RuntimeError, match="outside the pool"):
        native.store_kv(0, k, v, bad)


def test_each_checkout_builds_into_its_own_directory(tmp_path) -> None:
    # torch rebuilds a module whose build files name another source path: two
    # checkouts sharing a build directory rebuilt it on every switch.
    from splitserve.native import build_key

    here, there = tmp_path / "a" / "paged_decode.cpp", tmp_path / "b" / "paged_decode.cpp"
    assert build_key(b"src", ["-O3"], here) == build_key(b"src", ["-O3"], here)
    assert build_key(b"src", ["-O3"], here) != build_key(b"src", ["-O3"], there)
    assert build_key(b"src", ["-O3"], here) != build_key(b"other", ["-O3"], here)
