"""Attention over KV pages, bound to one step's batch.

`BatchAttention` implements the model's `PagedAttention` protocol: for each layer
it stores the step's new K/V into their pages (by slot mapping) and attends each
query token over its sequence's pages. Sequences with a single new token (decode)
are attended in padded groups; sequences with a prefill chunk one by one with a
causal mask offset by their cached context. Everything that is the same for all
layers (page/offset of each slot, masks) is computed once per step by the runner.

Attention runs in the model's dtype, as Hugging Face's SDPA path does: bf16 inputs
reach the CPU flash kernel, which accumulates in fp32 (no fp32 copies of K/V). With an
fp32 pool on a CPU, decode goes to a native op that reads the pages in place
(`engine/native_attention.py`) when it can be built.

The torch path below runs anywhere; on CUDA the Triton kernels can take over
through `AttentionKernels` (see `engine/attention_backend.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitserve.engine.kv_pool import KVPool
from splitserve.engine.native_attention import load_paged_decode, load_store_kv


@dataclass
class DecodeGroup:
    """Single-token sequences of similar length, padded to the longest member only.

    rows int64 `[B]`: their rows in the flat batch; page_tables int64 `[B, max_pages]`;
    seq_lens int64 `[B]` (KV length incl. the new token); page_ids int64
    `[B·max_pages]` (page_tables flattened); num_keys: keys attended per sequence after
    padding; mask bool `[B, 1, 1, num_keys]`, True where a key is attended, or None when
    all members have the same length (SDPA's masked path rounds differently from its
    unmasked one: 1 bf16 ulp, enough to change greedy tokens against Hugging Face);
    rows_are_all: the group is the whole batch in order.
    """

    rows: torch.Tensor
    page_tables: torch.Tensor
    seq_lens: torch.Tensor
    page_ids: torch.Tensor
    num_keys: int
    mask: torch.Tensor | None
    rows_are_all: bool = False


@dataclass
class PrefillChunk:
    """The last `num_new` of `seq_len` tokens of one sequence, at rows start.. of the batch.

    page_ids int64 `[num_pages]`; mask bool `[num_new, seq_len]` (None: no cached
    context, plain causal attention over the chunk itself).
    """

    start: int
    num_new: int
    seq_len: int
    page_ids: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class BatchLayout:
    """Where each sequence's tokens sit in the flat batch of T tokens.

    slot_mapping int64 `[T]`: page_id·page_size + offset for each new token;
    kv_rows int64 `[num_layers, 2, T]`: the same slots as rows of the pool viewed as
    `[rows, kv_heads·head_dim]`, per layer, for K and for V (see `kv_rows`).
    """

    slot_mapping: torch.Tensor
    kv_rows: torch.Tensor
    decode: list[DecodeGroup]
    prefill: list[PrefillChunk]


class TorchPagedAttention:
    """Paged attention in the KV dtype: torch ops, and the native decode op."""

    def __init__(self, pool: KVPool, scale: float, native: bool = True) -> None:
        self.pool = pool
        self.page_size = pool.geometry.page_size
        self.scale = scale
        # On a CPU the native kernel reads the pages in place (fp32, 16 sequences × 160
        # tokens, SmolLM2 geometry, 1 thread: 0.95 vs 2.0 ms per layer with the copy and
        # SDPA). fp32: every decode batch. bf16: batches of sequences of different
        # lengths, one call instead of SDPA per length bucket, with fp32 math and one
        # rounding (engine benchmark 241 -> 261 tok/s, 2 rounds); sequences of one
        # length (a lone one above all) stay on unmasked SDPA, whose roundings are the
        # ones transformers' bf16 path makes (greedy parity; the native op parts from
        # it after a few tokens, as SDPA's masked path already did in such batches).
        # The K/V store: two row copies per token from the model's views (torch: two
        # reshape copies and two index_copy_ per layer, 0.24 of 6.7 s in the bf16
        # engine benchmark).
        self._native_decode = None
        self._native_store = None
        self._native_for_all = pool.geometry.dtype == torch.float32
        if (native and pool.tensor.device.type == "cpu"
                and pool.geometry.dtype in (torch.float32, torch.bfloat16)):
            self._native_decode = load_paged_decode()
            self._native_store = load_store_kv()

    @property
    def reads_unpadded(self) -> bool:
        """Decode reads each sequence's own KV length whatever its group's padding."""
        return self._native_decode is not None

    def kv_rows(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Rows `[num_layers, 2, T]` of the pool's 2-D view where each layer's K and V
        of the slots go: computed once per step, so that storing a layer's K/V is two
        row copies (`index_copy_`) instead of two three-index `index_put`s."""
        g = self.pool.geometry
        ps = self.page_size
        first = (slot_mapping // ps) * (g.num_layers * 2 * ps) + slot_mapping % ps
        step = torch.arange(g.num_layers * 2, device=slot_mapping.device) * ps
        return (first[None, :] + step[:, None]).view(g.num_layers, 2, -1)

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, lay: BatchLayout) -> None:
        rows = self.pool.rows_view()
        if self._native_store is not None and k.dtype == rows.dtype:
            self._native_store(rows, lay.kv_rows[layer, 0], lay.kv_rows[layer, 1], k, v)
            return
        num_tokens = k.shape[0]
        rows.index_copy_(0, lay.kv_rows[layer, 0], k.reshape(num_tokens, -1).to(rows.dtype))
        rows.index_copy_(0, lay.kv_rows[layer, 1], v.reshape(num_tokens, -1).to(rows.dtype))

    def decode(self, layer: int, q: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        """q `[B, H, D]` (one token per sequence, already stored) → `[B, H, D]`.

        K and V are gathered separately (`kv[pages, 0]` is one contiguous copy) and
        handed to SDPA as transposed views: on 2 CPU cores this is ~1.9× faster than
        gathering both together and transposing for matmul (16 seqs × 640 tokens,
        SmolLM2 geometry: 59 vs 114 ms over 30 layers).
        """
        kv = self.pool.layer_view(layer)
        if self._native_decode is not None and (self._native_for_all or group.mask is not None):
            return self._native_decode(q, kv, group.page_tables, group.seq_lens,
                                       self.scale).to(q.dtype)
        num_seqs = group.page_tables.shape[0]
        num_kv_heads, head_dim = kv.shape[-2], kv.shape[-1]
        k = _gather_pages(kv, 0, group.page_ids).view(num_seqs, -1, num_kv_heads, head_dim)
        v = _gather_pages(kv, 1, group.page_ids).view(num_seqs, -1, num_kv_heads, head_dim)
        k, v = k[:, : group.num_keys], v[:, : group.num_keys]
        out = F.scaled_dot_product_attention(
            q.to(kv.dtype)[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=group.mask, scale=self.scale, enable_gqa=True,
        )
        return out[:, :, 0].to(q.dtype)

    def prefill(self, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                chunk: PrefillChunk) -> torch.Tensor:
        """q `[n, H, D]`, k_new/v_new `[n, KVH, D]`: the chunk's tokens (already stored).
        4-D inputs let SDPA take its flash kernel (3-D took the math path: 196 tokens,
        1.70 → 0.79 ms per layer)."""
        kv = self.pool.layer_view(layer)
        if chunk.mask is None:  # no cached context: the chunk's own K/V, not the pages
            k, v = k_new.to(kv.dtype), v_new.to(kv.dtype)
        else:
            k = _gather_pages(kv, 0, chunk.page_ids).flatten(0, 1)[: chunk.seq_len]
            v = _gather_pages(kv, 1, chunk.page_ids).flatten(0, 1)[: chunk.seq_len]
        q_t, k_t, v_t = (x.to(kv.dtype).transpose(0, 1)[None] for x in (q, k, v))
        out = F.scaled_dot_product_attention(
            q_t, k_t, v_t, attn_mask=chunk.mask, is_causal=chunk.mask is None,
            scale=self.scale, enable_gqa=True,
        )
        return out[0].transpose(0, 1).to(q.dtype)


def _gather_pages(kv: torch.Tensor, kv_index: int, page_ids: torch.Tensor) -> torch.Tensor:
    """K (kv_index 0) or V (1) of `page_ids` from a layer view `[P, 2, ps, KVH, D]`
    → contiguous `[len(page_ids), ps, KVH, D]`. index_select copies whole pages; advanced
    indexing (`kv[page_ids, 0]`) goes element by element: 0.03 against 1.0 ms for a
    2k-token context (SmolLM2 geometry, fp32, one thread)."""
    return kv.select(1, kv_index).index_select(0, page_ids)


class BatchAttention:
    """One step's attention: the callable the model invokes per layer."""

    def __init__(self, backend: TorchPagedAttention, layout: BatchLayout) -> None:
        self.backend = backend
        self.layout = layout

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        lay = self.layout
        self.backend.store_kv(layer, k, v, lay)
        if len(lay.decode) == 1 and lay.decode[0].rows_are_all:
            return self.backend.decode(layer, q, lay.decode[0])
        out = torch.empty_like(q)
        for group in lay.decode:
            out[group.rows] = self.backend.decode(layer, q[group.rows], group)
        for chunk in lay.prefill:
            rows = slice(chunk.start, chunk.start + chunk.num_new)
            out[rows] = self.backend.prefill(layer, q[rows], k[rows], v[rows], chunk)
        return out
