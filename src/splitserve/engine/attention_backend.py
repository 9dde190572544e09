"""Choosing the attention implementation: Triton kernels on CUDA, plain torch elsewhere.

`splitserve.kernels` is imported only when Triton is selected: importing triton
fixes, once per process, whether kernels compile or run in the interpreter
(`TRITON_INTERPRET=1`, set before the import), so the engine must not import it
on a CPU worker that does not use it.
"""

from __future__ import annotations

import os

import torch

from splitserve.engine.attention import (
    BatchLayout,
    DecodeGroup,
    PrefillChunk,
    TorchPagedAttention,
)
from splitserve.engine.kv_pool import KVPool
from splitserve.errors import ConfigError


class TritonPagedAttention(TorchPagedAttention):
    """Same interface as the torch path; the three hot operations run Triton kernels."""

    def __init__(self, pool: KVPool, scale: float) -> None:
        super().__init__(pool, scale, native=False)
        from splitserve import kernels

        self._k = kernels

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, lay: BatchLayout) -> None:
        kv = self.pool.layer_view(layer)
        self._k.store_kv(k.to(kv.dtype), v.to(kv.dtype), kv, lay.slot_mapping)

    def decode(self, layer: int, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        return self._k.paged_decode_attention(
            q, self.pool.layer_view(layer), group.page_tables, group.seq_lens, self.scale)

    def prefill(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                chunk: PrefillChunk) -> torch.Tensor:
        device = q.device
        cu_query_lens = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([chunk.seq_len], dtype=torch.int32, device=device)
        return self._k.paged_prefill_attention(
            q, self.pool.layer_view(layer), cu_query_lens, seq_lens, chunk.page_ids[None],
            self.scale)


def make_attention(backend: str, pool: KVPool, scale: float) -> TorchPagedAttention:
    device = pool.tensor.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return TorchPagedAttention(pool, scale)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention_backend", "triton on a CPU needs the Triton interpreter "
                          "(TRITON_INTERPRET=1, for tests only); use 'torch' or 'auto'")
    return TritonPagedAttention(pool, scale)
