"""What a generation request is once it has left the wire, and what comes back.

A neutral module: `control/` (the servicers) and the roles (`worker/`, later the
router) both import it, so `control/` imports no process layer.

`control/` turns protobuf into a `GenerateRequest`; a `GenerationService` (the
decode role) turns it into `GenerationChunk`s. Errors are raised as the typed
errors of `engine.errors` / `splitserve.errors`; `control/` maps them to status codes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.output import RequestOutput
from splitserve.engine.sampling import SamplingParams
from splitserve.model.tokenizer import ChatTemplateError, Tokenizer

MAX_PROMPT_CHARS = 1 << 20  # 1 MiB of text; far beyond any context length served here
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_RESERVED = frozenset(".*>:")  # NATS subject syntax; the job-id separator


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of `prompt` (text) and `prompt_token_ids` is set."""

    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    chat: bool = False
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: str = "normal"
    request_id: str = ""


@dataclass(frozen=True)
class Timing:
    """Carried by a request's last chunk."""

    queue_ms: float  # admission → first scheduling / job pickup
    ttft_ms: float  # admission → first token
    total_ms: float  # admission → last token
    prefill: str  # "local" or "remote"
    num_attempts: int = 1


@dataclass(frozen=True)
class GenerationChunk:
    request_id: str
    token_ids: list[int]
    text: str
    output: RequestOutput
    timing: Timing | None = None


class GenerationService(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerationChunk]:
        """Validate, admit and stream one request; raises typed errors before the first chunk."""
        ...


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_request_id(request_id: str) -> str:
    """The caller's id, or a new one when it is empty.

    It becomes gRPC metadata (printable ASCII only: "é" would fail there with
    INTERNAL after the call started) and a NATS subject token (no '.', '*', '>'),
    and ':' separates it from the attempt number in job ids.
    """
    if not request_id:
        return new_request_id()
    if len(request_id) > MAX_REQUEST_ID_CHARS or any(
            not 33 <= ord(c) <= 126 or c in _REQUEST_ID_RESERVED for c in request_id):
        raise InvalidRequest("request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} "
                             "printable ASCII characters without spaces, '.', '*', '>' or ':'")
    return request_id


def tokenize(tokenizer: Tokenizer, request: GenerateRequest) -> list[int]:
    """The prompt's token ids (text is encoded, with the chat template if asked)."""
    if (request.prompt is None) == (request.prompt_token_ids is None):
        raise InvalidRequest("prompt", "set exactly one of prompt and prompt_token_ids")
    if request.prompt_token_ids is not None:
        if request.chat:
            raise InvalidRequest("chat", "chat applies to a text prompt, not to token ids")
        return list(request.prompt_token_ids)
    text = request.prompt
    assert text is not None
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest("prompt", f"prompt is {len(text)} characters; the limit is "
                             f"{MAX_PROMPT_CHARS}")
    if not text:
        raise InvalidRequest("prompt", "prompt is empty")
    if request.chat:
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        except ChatTemplateError as exc:
            raise InvalidRequest("chat", str(exc)) from exc
    return tokenizer.encode(text)


def prepare_prompt(tokenizer: Tokenizer, validate: Callable[[list[int], SamplingParams], None],
                   request: GenerateRequest) -> list[int]:
    """`tokenize`, then `validate(prompt, params)` (e.g. `Engine.validate`): the per-token
    work of admitting a request, which for a long prompt takes long enough to stall the
    event loop; run it with `asyncio.to_thread`. Raises InvalidRequest."""
    prompt = tokenize(tokenizer, request)
    validate(prompt, request.params)
    return prompt
