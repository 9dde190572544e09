"""Backend selection helpers."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import interpreter_enabled, triton_available


def test_triton_is_never_chosen_for_cpu_tensors():
    # Even with the interpreter on (as in this test session on CPU), serving on CPU
    # must take the torch path: the interpreter is ~1 ms per program instance.
    assert triton_available("cpu") is False
    assert triton_available(torch.device("cpu")) is False


def test_interpreter_is_on_exactly_when_there_is_no_gpu():
    assert interpreter_enabled() is (not torch.cuda.is_available())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_available_on_cuda():
    assert triton_available(torch.device("cuda")) is True
