"""The engine on the Triton kernels gives the same tokens as on the torch path."""

from __future__ import annotations

import random

import pytest

from splitserve.engine.attention_backend import TritonPagedAttention
from splitserve.engine.sampling import SamplingParams
from splitserve.errors import ConfigError
from splitserve.kernels.backend import interpreter_enabled


@pytest.mark.skipif(not interpreter_enabled(), reason="the engine runs on the CPU, where its "
                    "Triton path needs the interpreter; here Triton compiles for the GPU")
def test_triton_backend_matches_torch_backend(tiny_engine) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (3, 9, 22)]
    params = SamplingParams(max_tokens=6, temperature=0)
    # a tight token budget makes the triton run cover chunked prefill over cached pages too
    triton_engine = tiny_engine(attention_backend="triton", max_num_batched_tokens=8)
    assert isinstance(triton_engine.runner.attention, TritonPagedAttention)
    assert triton_engine.generate(prompts, params) == tiny_engine(
        attention_backend="torch").generate(prompts, params)


def test_forcing_triton_on_cpu_without_interpreter_is_a_config_error(tiny_engine,
                                                                      monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="attention_backend: triton on a CPU needs"):
        tiny_engine(attention_backend="triton")
