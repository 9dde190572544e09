"""Native (C++) CPU ops, built with torch's `cpp_extension` on first use.

Each `*.cpp` here is one extension module: `paged_decode` (decode attention over the
KV pages in place, used by `engine/native_attention.py`) and `model_ops` (the Llama
layer's fused elementwise steps, used by `model/ops.py`). A module is compiled once
into the splitserve cache directory (about a minute on the 2-core box; `make setup`
does it) and later processes load the cached library in well under a second. The
cache key covers the source, the flags, the CPU's feature flags (`-march=native`),
torch's version and where the source and torch lie. Where a module cannot be built (no
C++ compiler, no headers), `load_extension` returns None once, logs why, and callers
keep their torch path.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import subprocess
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
_BASE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
# model_ops rounds where the torch ops round: no multiply-add contraction
_EXTRA_FLAGS = {"model_ops": ["-ffp-contract=off"]}
_loaded: dict[str, ModuleType | None] = {}


def load_extension(name: str) -> ModuleType | None:
    """The built module of `native/<name>.cpp`, or None where it cannot be built."""
    if name not in _loaded:
        _loaded[name] = _build(name)
    return _loaded[name]


def _build(name: str) -> ModuleType | None:
    from splitserve.model.loader import default_cache_dir

    source_path = _HERE / f"{name}.cpp"
    flags = _BASE_FLAGS + _EXTRA_FLAGS.get(name, [])
    try:
        from torch.utils import cpp_extension

        # the source and the headers it may include
        source = source_path.read_bytes() + b"".join(
            header.read_bytes() for header in sorted(_HERE.glob("*.h")))
        key = build_key(source, flags, source_path)
        build_dir = default_cache_dir() / "native" / key
        build_dir.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=f"splitserve_{name}_{key}", sources=[str(source_path)], extra_cflags=flags,
            extra_ldflags=["-fopenmp"], extra_include_paths=[str(_HERE)],
            build_directory=str(build_dir), verbose=False)
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as exc:
        log.warning("native %s unavailable (%s: %s); using the torch path", name,
                    type(exc).__name__, exc)
        return None
    log.info("native %s loaded from %s", name, build_dir)
    return module


def build_key(source: bytes, flags: list[str], source_path: Path) -> str:
    """The build directory's name. -march=native: a library built for another CPU (a
    shared cache) may not run here. The source's path and torch's install directory
    too: torch's build files name both, so two checkouts or virtualenvs sharing one
    directory rebuilt it each time the other had run (42 s seen)."""
    return hashlib.sha256(
        source + " ".join(flags).encode() + platform.machine().encode() + _cpu_flags()
        + torch.__version__.encode() + str(source_path.resolve()).encode()
        + str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:16]


def build_all() -> None:
    """Build every native module now (`make setup`), so no process waits for a build."""
    for source in sorted(_HERE.glob("*.cpp")):
        load_extension(source.stem)


def _cpu_flags() -> bytes:
    """This CPU's feature flags (Linux), so the build cache is per instruction set."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor().encode()
    return next((line for line in text.splitlines() if line.startswith("flags")), "").encode()
