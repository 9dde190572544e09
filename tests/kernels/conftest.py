"""Kernel tests run natively on a GPU, else under the Triton interpreter on CPU.

`TRITON_INTERPRET` must be set before a kernel module is imported: `triton.jit`
decides at decoration time whether it builds a compiled or an interpreted kernel.
If another test package already imported `splitserve.kernels` (through the engine),
those modules hold compiled-mode kernels that cannot run on CPU, so they are dropped
from `sys.modules` and this package's tests import them afresh.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in [m for m in sys.modules if m.startswith("splitserve.kernels")]:
        del sys.modules[_name]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
