"""Kernel tests run natively on a GPU, else under the Triton interpreter on CPU.

`TRITON_INTERPRET=1` must be set before `triton` is first imported: `triton.jit`
decides at decoration time whether a function is compiled or interpreted, and that
includes triton's own `tl.sum`, `tl.cdiv`, ... A compiled-mode triton cannot be
re-imported in the same process (its native extension refuses to register twice),
so if something imported triton earlier without the variable (e.g. a module the
top-level conftest imports), the kernel tests fail with instructions instead of
failing obscurely inside the interpreter.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_NEEDS_INTERPRETER = not torch.cuda.is_available()
_TRITON_ALREADY_IMPORTED = "triton" in sys.modules
if _NEEDS_INTERPRETER and not _TRITON_ALREADY_IMPORTED:
    os.environ["TRITON_INTERPRET"] = "1"


def _triton_is_compiled_mode() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(standard.cdiv, InterpretedFunction)


_BROKEN_SETUP = (
    _NEEDS_INTERPRETER and _TRITON_ALREADY_IMPORTED and _triton_is_compiled_mode()
)


@pytest.fixture(autouse=True)
def _require_interpreter_when_on_cpu() -> None:
    if _BROKEN_SETUP:
        pytest.fail(
            "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
            "on CPU in this process. Set os.environ['TRITON_INTERPRET'] = '1' (when "
            "torch.cuda.is_available() is False) at the top of tests/conftest.py, before any "
            "splitserve import, or run tests/kernels on its own."
        )


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
