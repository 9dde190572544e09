"""Every request validation error, with its message and field."""

from __future__ import annotations

import pytest

from splitserve.engine.errors import CapacityExceeded, DuplicateRequest, InvalidRequest
from splitserve.engine.sampling import SamplingParams


@pytest.mark.parametrize(
    ("prompt", "params", "field", "message"),
    [
        ([], SamplingParams(), "prompt", "prompt is empty"),
        ([1] * 1000, SamplingParams(max_tokens=25), "max_tokens",
         "prompt (1000 tokens) + max_tokens (25) = 1025 exceeds the context length (1024)"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens", "max_tokens must be >= 1, got 0"),
        ([1, 2], SamplingParams(temperature=-1.0), "temperature",
         "temperature must be >= 0, got -1.0"),
        ([1, 2], SamplingParams(temperature=float("nan")), "temperature",
         "temperature must be >= 0, got nan"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p", "top_p must be in (0, 1], got 0.0"),
        ([1, 2], SamplingParams(top_p=2.0), "top_p", "top_p must be in (0, 1], got 2.0"),
        ([1, 2], SamplingParams(top_k=-1), "top_k", "top_k must be >= 0 (0 disables it), got -1"),
        ([1, 512], SamplingParams(), "prompt_token_ids",
         "token id 512 is outside the vocabulary (0..511)"),
        ([-3], SamplingParams(), "prompt_token_ids",
         "token id -3 is outside the vocabulary (0..511)"),
        ([1], SamplingParams(stop_token_ids=(9999,)), "stop_token_ids",
         "stop token id 9999 is outside the vocabulary (0..511)"),
        ([1], SamplingParams(stop=("",)), "stop", "stop strings must not be empty"),
    ],
)
def test_invalid_requests_are_rejected_with_a_message(tiny_engine, prompt, params, field,
                                                      message) -> None:
    engine = tiny_engine()
    with pytest.raises(InvalidRequest) as err:
        engine.add_request("r", prompt, params)
    assert err.value.field == field
    assert str(err.value) == message
    assert not engine.has_unfinished  # nothing was admitted


def test_request_larger_than_the_pool_is_capacity_exceeded(tiny_engine) -> None:
    engine = tiny_engine(num_pages=8)  # 32 tokens
    with pytest.raises(CapacityExceeded, match="request needs 9 KV pages, this worker has 8"):
        engine.add_request("big", list(range(30)), SamplingParams(max_tokens=5))


def test_duplicate_request_id_is_rejected(tiny_engine) -> None:
    engine = tiny_engine()
    engine.add_request("same", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(DuplicateRequest, match="'same' is already running"):
        engine.add_request("same", [4, 5], SamplingParams(max_tokens=2))


def test_engine_keeps_serving_after_rejections(tiny_engine) -> None:
    engine = tiny_engine()
    for bad in (SamplingParams(max_tokens=0), SamplingParams(top_p=5.0)):
        with pytest.raises(InvalidRequest):
            engine.add_request("bad", [1, 2], bad)
    [out] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
    assert len(out) == 4
