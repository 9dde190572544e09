"""The OpenAI API's request and response shapes, as plain data (no I/O, no HTTP).

`parse_request` turns a decoded JSON body of `/v1/completions` or
`/v1/chat/completions` into an `OpenAIRequest`, or raises `OpenAIError` naming the
parameter, with the HTTP status and error type an OpenAI client expects. What is
accepted: `model`, `prompt` (a string, one string in a list, token ids, or one list of
token ids) or `messages` (system, developer, user and assistant messages; text content
or text parts), `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`,
`stop`, `n` = 1, `stream`, `stream_options.include_usage`, `priority`; and, as vLLM
does, `top_k`, `ignore_eos`, `stop_token_ids`. Options this server cannot honour
(`logprobs`, `echo`, `best_of` > 1, penalties, `logit_bias`, tools, JSON mode) are
refused when set to anything but their default, never silently ignored. Unknown
fields are ignored, as OpenAI's own server does.

The `*_response` and `*_chunk` functions render what goes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from splitserve.control.convert import MAX_STOP_STRINGS  # the workers' own limit
from splitserve.priority import PRIORITIES

Kind = Literal["completion", "chat"]
MAX_UINT32 = (1 << 32) - 1
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user",
              "assistant": "assistant"}
# Parameter → the values that mean "off"; anything else is refused.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class OpenAIError(Exception):
    """An error as OpenAI's API reports it: HTTP status and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type, self.code, self.headers = type_, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _text(value: str, name: str) -> str:
    """`value` if it is valid Unicode (JSON may carry lone surrogates, "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(name, f"{name} is not valid Unicode (a lone surrogate)") from None
    return value


@dataclass(frozen=True)
class OpenAIRequest:
    kind: Kind
    model: str
    prompt_text: str | None = None  # completion: one of these three is set
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] = ()  # chat
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    priority: str = ""


def _number(body: dict[str, Any], name: str, low: float, high: float,
            low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, f"{name} must be a number, got {type(value).__name__}")
    if not ((low < value) if low_open else (low <= value)) or not value <= high:
        bracket = "(" if low_open else "["
        raise invalid(name, f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(name, f"{name} must be in [{low}, {high}], got {value}")
    return value


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if not value or not all(isinstance(t, int) and not isinstance(t, bool)
                            and 0 <= t <= MAX_UINT32 for t in value):
        raise invalid(name, f"{name} must be a non-empty list of token ids (integers >= 0)")
    return tuple(value)


def _prompt(body: dict[str, Any]) -> tuple[str | None, tuple[int, ...] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "prompt is empty")
        return _text(prompt, "prompt"), None
    if isinstance(prompt, list) and prompt and all(isinstance(p, list | str) for p in prompt):
        raise invalid("prompt", "one prompt per request: batches are not supported")
    if isinstance(prompt, list):
        return None, _token_ids(prompt, "prompt")
    raise invalid("prompt", "prompt must be a string or a list of token ids")


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return _text(value, where)
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for part in value:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(where, "only text content parts are supported")
            parts.append(part["text"])
        return _text("".join(parts), where)
    raise invalid(where, "content must be a string or a list of text parts")


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]", "each message must be an object")
        role = CHAT_ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise invalid(f"messages[{i}].role", f"role must be one of {sorted(CHAT_ROLES)}, "
                          f"got {message.get('role')!r}")
        out.append({"role": role, "content": _content(message.get("content"),
                                                      f"messages[{i}].content")})
    return tuple(out)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise invalid("stop", f"stop must be a non-empty string or a list of at most "
                      f"{MAX_STOP_STRINGS} of them")
    return tuple(_text(s, "stop") for s in stops)


def _is_default(value: Any, defaults: tuple[Any, ...]) -> bool:
    """Equal to one of `defaults` and of its type (so `logprobs: 0` is not `False`)."""
    return any(value is d or (type(value) is type(d) and value == d) for d in defaults)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false")
    return value


def parse_request(kind: Kind, body: Any, priority_header: str = "") -> OpenAIRequest:
    """The request in `body` (decoded JSON); `priority_header` is `x-priority`."""
    if not isinstance(body, dict):
        raise invalid("", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model is required (a string; see GET /v1/models)")
    for name, defaults in UNSUPPORTED.items():
        if name in body and not _is_default(body[name], defaults):
            raise invalid(name, f"{name} is not supported by this server")
    if _integer(body, "n", 1, 1) not in (None, 1):
        raise invalid("n", "n must be 1")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise invalid("stream_options", "stream_options is an object, only with stream: true")
    include_usage = _flag(options, "include_usage") if options else False
    priority = body.get("priority", None) or priority_header or ""
    if priority not in ("", *PRIORITIES):
        raise invalid("priority", f"priority must be one of {list(PRIORITIES)}")
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_UINT32)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_UINT32)
    top_k = _integer(body, "top_k", -1, MAX_UINT32) or 0
    stop_ids = body.get("stop_token_ids")
    prompt_text, prompt_ids = _prompt(body) if kind == "completion" else (None, None)
    return OpenAIRequest(
        kind=kind, model=model, prompt_text=prompt_text, prompt_token_ids=prompt_ids,
        messages=_messages(body) if kind == "chat" else (),
        max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True), top_k=max(top_k, 0),
        seed=_integer(body, "seed", 0, (1 << 64) - 1), stop=_stop(body),
        stop_token_ids=_token_ids(stop_ids, "stop_token_ids") if stop_ids else (),
        ignore_eos=_flag(body, "ignore_eos"), stream=stream, include_usage=include_usage,
        priority=priority)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def response_id(kind: Kind, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def full_response(kind: Kind, request_id: str, created: int, model: str, text: str,
                  finish_reason: str, usage: Usage) -> dict[str, Any]:
    """The non-streaming answer."""
    if kind == "chat":
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason,
                                  "message": {"role": "assistant", "content": text}}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": response_id(kind, request_id),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [choice],
            "usage": usage.as_dict()}


def stream_chunk(kind: Kind, request_id: str, created: int, model: str, *,
                 text: str | None = None, finish_reason: str | None = None,
                 first: bool = False, usage: Usage | None = None,
                 include_usage: bool = False) -> dict[str, Any]:
    """One SSE event's JSON. `usage` set: the final usage-only chunk (no choices)."""
    chunk: dict[str, Any] = {
        "id": response_id(kind, request_id),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created, "model": model}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage.as_dict()
        return chunk
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    chunk["choices"] = [choice]
    if include_usage:
        chunk["usage"] = None
    return chunk
