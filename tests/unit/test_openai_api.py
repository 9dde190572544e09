"""router/openai_api.py: what each OpenAI request field becomes, which values are
refused with which parameter named, and the shapes of the answers."""

from __future__ import annotations

from typing import Any

import pytest

from splitserve.router.openai_api import (
    OpenAIError,
    Usage,
    full_response,
    parse_request,
    stream_chunk,
)


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "Hi", **fields}


def test_a_full_completion_request() -> None:
    req = parse_request("completion", completion(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=3, stop=["\n", "END"],
        stream=True, stream_options={"include_usage": True}, ignore_eos=True,
        stop_token_ids=[2], priority="high", user="someone", n=1, logprobs=None))
    assert (req.prompt_text, req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed,
            req.stop, req.stream, req.include_usage, req.ignore_eos, req.stop_token_ids,
            req.priority) == ("Hi", 7, 0.5, 0.9, 40, 3, ("\n", "END"), True, True, True,
                              (2,), "high")


@pytest.mark.parametrize(("prompt", "text", "ids"), [
    ("Hi", "Hi", None), (["Hi"], "Hi", None), ([1, 2, 3], None, (1, 2, 3)),
    ([[1, 2]], None, (1, 2)),
])
def test_prompt_forms(prompt: Any, text: str | None, ids: tuple[int, ...] | None) -> None:
    req = parse_request("completion", completion(prompt=prompt))
    assert (req.prompt_text, req.prompt_token_ids) == (text, ids)


def test_defaults_leave_the_worker_to_decide() -> None:
    req = parse_request("completion", completion())
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.top_k) == (
        None, None, None, None, 0)


def test_max_completion_tokens_wins_and_header_priority_applies() -> None:
    req = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "a"}],
                                 "max_tokens": 5, "max_completion_tokens": 9}, "low")
    assert (req.max_tokens, req.priority) == (9, "low")


def test_chat_messages_and_text_parts() -> None:
    req = parse_request("chat", {"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                     {"type": "text", "text": "lo"}]},
        {"role": "assistant", "content": "Hi"}]})
    assert req.messages == ({"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": "Hi"})


@pytest.mark.parametrize(("kind", "body", "param"), [
    ("completion", [], ""),
    ("completion", {"prompt": "Hi"}, "model"),
    ("completion", completion(prompt=""), "prompt"),
    ("completion", completion(prompt=["a", "b"]), "prompt"),
    ("completion", completion(prompt=[1, True]), "prompt"),
    ("completion", completion(prompt=None), "prompt"),
    ("completion", completion(max_tokens=0), "max_tokens"),
    ("completion", completion(max_tokens=1.5), "max_tokens"),
    ("completion", completion(max_tokens=1 << 32), "max_tokens"),
    ("completion", completion(temperature="hot"), "temperature"),
    ("completion", completion(temperature=-0.1), "temperature"),
    ("completion", completion(top_p=0), "top_p"),
    ("completion", completion(seed=-1), "seed"),
    ("completion", completion(n=3), "n"),
    ("completion", completion(stop=[""]), "stop"),
    ("completion", completion(stop=["x"] * 17), "stop"),
    ("completion", completion(stream="yes"), "stream"),
    ("completion", completion(stream_options={"include_usage": True}), "stream_options"),
    ("completion", completion(echo=True), "echo"),
    ("completion", completion(logprobs=0.0), "logprobs"),
    ("completion", completion(best_of=2), "best_of"),
    ("completion", completion(presence_penalty=0.5), "presence_penalty"),
    ("completion", completion(priority="urgent"), "priority"),
    ("completion", completion(prompt="\ud800"), "prompt"),
    ("chat", {"model": "m", "messages": []}, "messages"),
    ("chat", {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": 5}]},
     "messages[0].content"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}],
              "tools": [{"type": "function"}]}, "tools"),
])
def test_refusals_name_the_parameter(kind: Any, body: Any, param: str) -> None:
    with pytest.raises(OpenAIError) as err:
        parse_request(kind, body)
    assert (err.value.status, err.value.param) == (400, param)
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_defaults_of_unsupported_options_pass() -> None:
    parse_request("completion", completion(logprobs=None, echo=False, best_of=1,
                                           presence_penalty=0, frequency_penalty=0.0,
                                           logit_bias={}))


def test_answer_shapes() -> None:
    usage = Usage(5, 3, cached_tokens=2)
    chat = full_response("chat", "r1", 7, "m", "Hello", "stop", usage)
    assert chat["id"] == "chatcmpl-r1" and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert chat["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    text = full_response("completion", "r1", 7, "m", "Hello", "length", usage)
    assert text["choices"][0]["text"] == "Hello" and text["id"] == "cmpl-r1"
    first = stream_chunk("chat", "r1", 7, "m", text="He", first=True, include_usage=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    assert first["usage"] is None
    last = stream_chunk("chat", "r1", 7, "m", text="", finish_reason="stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": "stop"}
    assert stream_chunk("completion", "r1", 7, "m", usage=usage)["choices"] == []
