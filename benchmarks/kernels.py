"""Bandwidth of the Triton KV kernels against a device-to-device copy and torch SDPA.

    python benchmarks/kernels.py --json          # GPU: full sweep, one JSON object
    python benchmarks/kernels.py --smoke --json  # CPU or GPU: tiny shapes, < 60 s

Definitions (all measured in the same run, on the same device):
  * `bytes`: what the kernel must move at least. Decode attention: the sequences'
    K and V plus q and the output. pack/unpack: the pages read plus the pages written.
  * `kernel_gbps = bytes / kernel time`.
  * `copy_gbps`: a `torch` `copy_` between two buffers of the same total size,
    counting read plus write, i.e. the achievable memory bandwidth.
  * `fraction_of_copy = kernel_gbps / copy_gbps` (1.0 = as fast as a plain copy).
  * `sdpa_ms`: `scaled_dot_product_attention` on K/V already gathered into
    contiguous `[B, num_kv_heads, L, D]` (its gather is not counted);
    `speedup_vs_sdpa = sdpa_ms / kernel_ms`.
GPU times are medians of CUDA-event timings after warmup, with a 256 MiB buffer
written before each iteration so that L2 never holds the previous iteration's KV.
Without a GPU, `--smoke` runs the kernels in the Triton interpreter (numbers then
only show that the benchmark works, not how fast anything is).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before splitserve.kernels is imported

import torch.nn.functional as F
import triton

from splitserve.kernels import pack_pages, paged_decode_attention, unpack_pages
from splitserve.kernels.decode_attention import default_num_splits


@dataclass(frozen=True)
class AttentionShape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int


SHAPES = [
    AttentionShape("llama-32q-8kv-128d", 32, 8, 128, 32),  # Llama-3-8B geometry
    AttentionShape("smollm2-9q-3kv-64d", 9, 3, 64, 30),  # SmolLM2-135M
]


@dataclass(frozen=True)
class Sweep:
    page_sizes: tuple[int, ...]
    context_lens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    num_layers: int | None  # None: the model's own layer count (for pack/unpack pools)
    pack_num_pages: tuple[int, ...]
    warmup: int
    iters: int
    max_case_bytes: int


FULL = Sweep((16, 64), (512, 2048, 8192, 32768), (1, 8, 32, 128), None, (1, 16, 256, 1024),
             warmup=5, iters=20, max_case_bytes=32 << 30)
SMOKE = Sweep((16,), (40,), (1, 2), 2, (2,), warmup=1, iters=1, max_case_bytes=1 << 30)


class Timer:
    """Median wall time of `fn` in ms; CUDA events on GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters
        self.flush = (torch.empty(256 << 20, dtype=torch.uint8, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.flush is not None:
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_gbps(num_bytes: int, timer: Timer) -> float:
    """Bandwidth of a device-to-device copy of `num_bytes` (read + write counted)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def _scattered_page_tables(batch_size: int, pages_per_seq: int, device: torch.device
                            ) -> torch.Tensor:
    num_pages = batch_size * pages_per_seq
    return torch.randperm(num_pages).view(batch_size, pages_per_seq).to(device, torch.int32)


def bench_decode(shape: AttentionShape, page_size: int, context_len: int, batch_size: int,
                 dtype: torch.dtype, timer: Timer, max_case_bytes: int) -> dict[str, object] | None:
    elem = torch.empty((), dtype=dtype).element_size()
    kv_bytes = batch_size * context_len * 2 * shape.num_kv_heads * shape.head_dim * elem
    q_out_bytes = 2 * batch_size * shape.num_heads * shape.head_dim * elem
    # Peak: the pages, SDPA's gathered K/V, and the two buffers of the copy baseline.
    if 4 * kv_bytes > max_case_bytes:
        return None
    device = timer.device
    pages_per_seq = math.ceil(context_len / page_size)
    kv_layer = torch.randn(batch_size * pages_per_seq, 2, page_size, shape.num_kv_heads,
                           shape.head_dim, device=device, dtype=dtype)
    page_tables = _scattered_page_tables(batch_size, pages_per_seq, device)
    seq_lens = torch.full((batch_size,), context_len, dtype=torch.int32, device=device)
    q = torch.randn(batch_size, shape.num_heads, shape.head_dim, device=device, dtype=dtype)
    scale = shape.head_dim ** -0.5
    num_splits = default_num_splits(batch_size, shape.num_kv_heads,
                                    page_tables.shape[1] * page_size, device)

    out = paged_decode_attention(q, kv_layer, page_tables, seq_lens, scale)
    kernel_ms = timer(lambda: paged_decode_attention(q, kv_layer, page_tables, seq_lens, scale))

    gathered = kv_layer[page_tables.long()]  # [B, pages, 2, page, Hkv, D]
    k = gathered[:, :, 0].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    v = gathered[:, :, 1].flatten(1, 2)[:, :context_len].transpose(1, 2).contiguous()
    del gathered
    q4 = q.unsqueeze(2)  # [B, H, 1, D]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

    dense = sdpa().squeeze(2)
    sdpa_ms = timer(sdpa)
    num_bytes = kv_bytes + q_out_bytes
    baseline = copy_gbps(num_bytes, timer)
    kernel_gbps = num_bytes / (kernel_ms * 1e-3) / 1e9
    return {
        "model": shape.name, "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "page_size": page_size, "context_len": context_len,
        "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
        "num_splits": num_splits, "bytes": num_bytes, "kernel_ms": kernel_ms,
        "kernel_gbps": kernel_gbps, "copy_gbps": baseline,
        "fraction_of_copy": kernel_gbps / baseline, "sdpa_ms": sdpa_ms,
        "speedup_vs_sdpa": sdpa_ms / kernel_ms,
        "max_abs_error_vs_sdpa": float((out.float() - dense.float()).abs().max()),
    }


def bench_pages(shape: AttentionShape, page_size: int, num_layers: int, num_pages: int,
                dtype: torch.dtype, timer: Timer, max_case_bytes: int) -> list[dict[str, object]]:
    page_shape = (num_layers, 2, page_size, shape.num_kv_heads, shape.head_dim)
    page_bytes = math.prod(page_shape) * torch.empty((), dtype=dtype).element_size()
    pool_pages = 2 * num_pages
    if (pool_pages + 3 * num_pages) * page_bytes > max_case_bytes:  # pool, staging, copy
        return []
    device = timer.device
    pool = torch.randn((pool_pages, *page_shape), device=device, dtype=dtype)
    page_ids = torch.randperm(pool_pages)[:num_pages].to(device)
    staging = torch.empty((num_pages, *page_shape), device=device, dtype=dtype)
    num_bytes = 2 * num_pages * page_bytes  # each page read once and written once
    baseline = copy_gbps(num_pages * page_bytes, timer)
    results = []
    for op, fn in (("pack", lambda: pack_pages(pool, page_ids, out=staging)),
                   ("unpack", lambda: unpack_pages(staging, pool, page_ids))):
        ms = timer(fn)
        gbps = num_bytes / (ms * 1e-3) / 1e9
        results.append({
            "op": op, "model": shape.name, "num_layers": num_layers, "page_size": page_size,
            "page_bytes": page_bytes, "num_pages": num_pages,
            "dtype": str(dtype).removeprefix("torch."),
            "bytes": num_bytes, "kernel_ms": ms, "kernel_gbps": gbps, "copy_gbps": baseline,
            "fraction_of_copy": gbps / baseline,
        })
    return results


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, num_sms=props.multi_processor_count,
                    gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        info.update(cpu=platform.processor() or platform.machine(), num_cpus=os.cpu_count())
    return info


def run(sweep: Sweep, device: torch.device, dtype: torch.dtype) -> dict[str, object]:
    torch.manual_seed(0)
    timer = Timer(device, sweep.warmup, sweep.iters)
    decode, pages, skipped = [], [], []
    for shape in SHAPES:
        for page_size in sweep.page_sizes:
            for context_len in sweep.context_lens:
                for batch_size in sweep.batch_sizes:
                    case = bench_decode(shape, page_size, context_len, batch_size, dtype, timer,
                                        sweep.max_case_bytes)
                    if case is None:
                        skipped.append(f"decode {shape.name} page {page_size} ctx {context_len} "
                                       f"batch {batch_size}: over the memory budget")
                    else:
                        decode.append(case)
            num_layers = sweep.num_layers or shape.num_layers
            for num_pages in sweep.pack_num_pages:
                cases = bench_pages(shape, page_size, num_layers, num_pages, dtype, timer,
                                    sweep.max_case_bytes)
                if not cases:
                    skipped.append(f"pack/unpack {shape.name} page {page_size} x{num_pages}: "
                                   "over the memory budget")
                pages.extend(cases)
    return {
        "benchmark": "kernels", "smoke": sweep is SMOKE, "machine": machine(device),
        "shapes": [vars(s) for s in SHAPES],
        "sweep": {"page_sizes": sweep.page_sizes, "context_lens": sweep.context_lens,
                  "batch_sizes": sweep.batch_sizes, "pack_num_pages": sweep.pack_num_pages,
                  "warmup": sweep.warmup, "iters": sweep.iters},
        "decode": decode, "pages": pages, "skipped": skipped,
    }


def _print_table(result: dict[str, object]) -> None:
    print(f"machine: {result['machine']}")
    for case in result["decode"]:  # type: ignore[union-attr]
        print(f"decode {case['model']:>20} page {case['page_size']:>2} "
              f"ctx {case['context_len']:>5} "
              f"B {case['batch_size']:>3} splits {case['num_splits']:>2}: "
              f"{case['kernel_gbps']:8.3g} GB/s = {case['fraction_of_copy']:.3g} of copy, "
              f"{case['speedup_vs_sdpa']:.3g}x SDPA")
    for case in result["pages"]:  # type: ignore[union-attr]
        print(f"{case['op']:>6} {case['model']:>20} page {case['page_size']:>2} "
              f"x{case['num_pages']:>4}: {case['kernel_gbps']:8.3g} GB/s = "
              f"{case['fraction_of_copy']:.3g} of copy")
    for line in result["skipped"]:  # type: ignore[union-attr]
        print(f"skipped: {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpreter on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(SMOKE if args.smoke else FULL, device, getattr(torch, args.dtype))
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
