"""When the Triton kernels can run, and launch-size helpers shared by the wrappers."""

from __future__ import annotations

import functools
import os

import torch

# Triton compiles on CUDA only; on CPU the kernels run solely under TRITON_INTERPRET=1,
# which is a numpy emulator (~1 ms per program instance) meant for tests, never for
# serving. `triton_available` therefore says no for CPU even when the interpreter is on.


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can serve on `device` (a CUDA device with triton)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and _triton_importable()


def interpreter_enabled() -> bool:
    """True when Triton kernels are emulated on CPU (`TRITON_INTERPRET=1`, tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_compute_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small fixed count elsewhere.

    The CPU value (4) only matters under the interpreter, where it makes the
    automatic split-KV heuristic split short test contexts too.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_num_sms(index)
    return 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: exact fp32 ("ieee") for fp32 operands, which ask for
    fp32 results (a GPU's default, tf32, rounds operands to 10 mantissa bits: 5e-5 apart
    between split counts, seen on an H200); else tf32, exact for bf16/fp16 operands
    (the probabilities are rounded to 10 bits, finer than the KV's own 8). Decode stays
    memory-bound either way (fp32 KV: 8 FMA flops per byte); fp32 prefill is the
    precise mode, bf16 the fast one."""
    return "ieee" if dtype == torch.float32 else "tf32"
