"""Native (C++) decode attention over the KV pages in place, for the CPU.

The torch path copies every decode sequence's K and V out of the pages each step and
layer (`index_select`) before SDPA reads them again; `native/paged_decode.cpp` reads
each K/V row once, where it lies. It is compiled with torch's `cpp_extension` on first
use into the splitserve cache directory (about a minute on the 2-core box; later
processes load the cached library in well under a second). Where it cannot be built
(no C++ compiler), `load_paged_decode` returns None once, logs why, and the engine keeps
the torch path.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("native") / "paged_decode.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]

PagedDecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                       torch.Tensor]
_loaded: dict[str, PagedDecode | None] = {}


def load_paged_decode() -> PagedDecode | None:
    """`paged_decode(q [B, H, D], kv layer view [P, 2, page_size, KVH, D], block_tables
    int64 [B, W], seq_lens int64 [B], scale) → [B, H, D]` in the KV dtype, or None."""
    if "op" not in _loaded:
        _loaded["op"] = _build()
    return _loaded["op"]


def _build() -> PagedDecode | None:
    from splitserve.model.loader import default_cache_dir

    try:
        from torch.utils import cpp_extension

        source = _SOURCE.read_bytes()
        # -march=native: a library built for another CPU (a shared cache) may not run here
        key = hashlib.sha256(source + " ".join(_FLAGS).encode() + platform.machine().encode()
                             + _cpu_flags() + torch.__version__.encode()).hexdigest()[:16]
        build_dir = default_cache_dir() / "native" / key
        build_dir.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=f"splitserve_paged_decode_{key}", sources=[str(_SOURCE)],
            extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], build_directory=str(build_dir),
            verbose=False)
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as exc:
        # no compiler, no headers, a failed build: keep the torch path
        log.warning("native decode attention unavailable (%s: %s); using the torch path",
                    type(exc).__name__, exc)
        return None
    log.info("native decode attention loaded from %s", build_dir)
    op: PagedDecode = module.paged_decode
    return op


def _cpu_flags() -> bytes:
    """This CPU's feature flags (Linux), so the build cache is per instruction set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return next((line for line in text.splitlines() if line.startswith("flags")), "").encode()
