"""The router's OpenAI-compatible HTTP API, on aiohttp.

Why aiohttp: one well-kept package (server and client, no ASGI layer), whose server
runs inside the daemon's own asyncio loop next to grpc.aio and nats-py; it caps a
body at `client_max_size` while reading it (before any parsing), and with
`handler_cancellation` it cancels a handler whose client went away, which cancels
the worker's call and frees the request's pages.

Life cycle of `POST /v1/completions` and `POST /v1/chat/completions`:
1. API key (`authorization: Bearer`) when `auth.require_generate`: none or unknown →
   401, a key without scope `generate` → 403.
2. Read the body (over `max_body_bytes` → 413), decode JSON (not JSON, not UTF-8 →
   400), `parse_request` (bad field → 400 naming it; another model → 404).
3. Tokenize here (the chat template over the messages), in a thread: the worker gets
   token ids, so every worker sees the same ids and a routed request equals a direct one.
4. Forward (forward.py: admission may refuse it, 429, or cap its max_tokens, which the
   `x-splitserve-degraded` header then says). Errors before the first chunk become
   HTTP statuses (`STATUS_OF`); with `stream` the response starts at the first chunk,
   so a prompt too long for the context is still a 400.
5. Non-streaming: one JSON answer with `usage`. Streaming: SSE `data:` events, then
   `data: [DONE]`; an error after the start is sent as a `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from splitserve.client import generate_request
from splitserve.config.security import AuthConfig
from splitserve.control.auth import TokenFile
from splitserve.control.status import FIELD_KEY
from splitserve.engine.errors import InvalidRequest
from splitserve.ingress import check_request_id
from splitserve.model.tokenizer import ChatTemplateError, Tokenizer
from splitserve.router.forward import Forwarder, ForwardNote, UpstreamError
from splitserve.router.metrics import CONTENT_TYPE, RouterMetrics
from splitserve.router.openai_api import (
    Kind,
    OpenAIError,
    OpenAIRequest,
    Usage,
    full_response,
    parse_request,
    stream_chunk,
)
from splitserve.rpc import generation_pb2 as pb

log = logging.getLogger(__name__)

# gRPC status of a failed request → (HTTP status, OpenAI error type)
STATUS_OF: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
}
FINISH_REASON = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
RETRY_AFTER_S = "1"
DEGRADED_HEADER = "x-splitserve-degraded"  # "max_tokens=N": capped under load


def upstream_error(exc: UpstreamError) -> OpenAIError:
    status, type_ = STATUS_OF.get(exc.code, (500, "server_error"))
    if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        status = 502  # the router's own credentials for the workers are wrong
    field = dict(exc.trailing).get(FIELD_KEY)
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else {}
    return OpenAIError(status, exc.details or exc.code.name, param=field, type_=type_,
                       code=exc.code.name.lower(), headers=headers)


def error_response(error: OpenAIError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


class HttpApi:
    def __init__(self, forwarder: Forwarder, tokenizer: Tokenizer, model_name: str,
                 auth: AuthConfig) -> None:
        self.forwarder = forwarder
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.tokens = TokenFile(auth.tokens_file) if auth.require_generate else None
        self.created = int(time.time())
        self.max_body_bytes = 0
        self.metrics = RouterMetrics(forwarder, model_name)

    def app(self, max_body_bytes: int) -> web.Application:
        self.max_body_bytes = max_body_bytes
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        try:
            if request.path.startswith("/v1/"):
                self._check_key(request)
            return await handler(request)
        except OpenAIError as exc:
            return error_response(exc)
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp: the same shape
            text = (f"the request body is over {self.max_body_bytes} bytes"
                    if exc.status == 413 else exc.reason)
            return error_response(OpenAIError(exc.status, text, type_=(
                "not_found_error" if exc.status == 404 else "invalid_request_error")))

    def _check_key(self, request: web.Request) -> None:
        if self.tokens is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        token = self.tokens.lookup(key.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            self.metrics.refused(grpc.StatusCode.UNAUTHENTICATED)
            raise OpenAIError(401, "missing or unknown API key (authorization: Bearer KEY)",
                              type_="authentication_error", code="invalid_api_key")
        if "generate" not in token.scopes:
            self.metrics.refused(grpc.StatusCode.PERMISSION_DENIED)
            raise OpenAIError(403, f"API key {token.name!r} lacks the scope 'generate'",
                              type_="permission_error")

    async def health(self, request: web.Request) -> web.Response:
        num = self.forwarder.pool.num_eligible()
        return web.json_response({"status": "ok" if num else "no decode worker serving",
                                  "num_workers_serving": num}, status=200 if num else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"content-type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "splitserve"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()  # raises 413 past client_max_size, unread
        try:
            return json.loads(raw)
        except UnicodeDecodeError:
            raise OpenAIError(400, "the body is not valid UTF-8") from None
        except ValueError as exc:
            raise OpenAIError(400, f"the body is not valid JSON ({exc})") from None

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        received_s = time.monotonic()
        parsed = parse_request(kind, await self._body(request),
                               request.headers.get("x-priority", "").strip().lower())
        if parsed.model != self.model_name:
            raise OpenAIError(404, f"the model {parsed.model!r} does not exist; this server "
                              f"serves {self.model_name!r}", param="model",
                              type_="not_found_error", code="model_not_found")
        try:
            request_id = check_request_id(request.headers.get("x-request-id", ""))
        except InvalidRequest as exc:
            raise OpenAIError(400, str(exc), param="x-request-id") from None
        proto = await asyncio.to_thread(self._to_proto, parsed, request_id)
        note = ForwardNote()
        async with contextlib.aclosing(self.forwarder.stream(proto, note, received_s)) as chunks:
            try:
                first = await anext(chunks, None)
            except UpstreamError as exc:
                raise upstream_error(exc) from None
            headers = {"x-request-id": request_id}
            if note.degraded_max_tokens is not None:
                headers[DEGRADED_HEADER] = f"max_tokens={note.degraded_max_tokens}"
            if parsed.stream:
                return await self._stream(request, parsed, request_id, first, chunks, headers)
            return await self._collect(parsed, request_id, first, chunks, headers)

    def _to_proto(self, parsed: OpenAIRequest, request_id: str) -> pb.GenerateRequest:
        if parsed.kind == "chat":
            try:
                text = self.tokenizer.apply_chat_template(list(parsed.messages))
            except ChatTemplateError as exc:
                raise OpenAIError(400, str(exc), param="messages") from None
            token_ids: tuple[int, ...] = tuple(self.tokenizer.encode(text))
        elif parsed.prompt_text is not None:
            token_ids = tuple(self.tokenizer.encode(parsed.prompt_text))
        else:
            token_ids = parsed.prompt_token_ids or ()
        return generate_request(
            token_ids=token_ids, max_tokens=parsed.max_tokens, temperature=parsed.temperature,
            top_p=parsed.top_p, top_k=parsed.top_k, seed=parsed.seed, stop=parsed.stop,
            stop_token_ids=parsed.stop_token_ids, ignore_eos=parsed.ignore_eos,
            priority=parsed.priority, request_id=request_id)

    async def _collect(self, parsed: OpenAIRequest, request_id: str,
                       first: pb.GenerateChunk | None,
                       chunks: AsyncIterator[pb.GenerateChunk],
                       headers: dict[str, str]) -> web.Response:
        texts, last = [], first
        try:
            if first is not None:
                texts.append(first.text)
                async for chunk in chunks:
                    texts.append(chunk.text)
                    last = chunk
        except UpstreamError as exc:
            raise upstream_error(exc) from None
        finish, usage = _ending(last)
        return web.json_response(full_response(
            parsed.kind, request_id, int(time.time()), self.model_name, "".join(texts),
            finish, usage), headers=headers)

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, request_id: str,
                      first: pb.GenerateChunk | None, chunks: AsyncIterator[pb.GenerateChunk],
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "content-type": "text/event-stream", "cache-control": "no-cache", **headers})
        await response.prepare(request)
        created, kind = int(time.time()), parsed.kind

        async def send(data: Any) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await response.write(f"data: {payload}\n\n".encode())

        def event(chunk: pb.GenerateChunk, first_event: bool) -> dict[str, Any]:
            finish = FINISH_REASON.get(chunk.finish_reason)
            return stream_chunk(kind, request_id, created, self.model_name, text=chunk.text,
                                finish_reason=finish, first=first_event,
                                include_usage=parsed.include_usage)

        last = first
        try:
            if first is not None:
                await send(event(first, True))
                async for chunk in chunks:
                    await send(event(chunk, False))
                    last = chunk
            _, usage = _ending(last)
            if parsed.include_usage:
                await send(stream_chunk(kind, request_id, created, self.model_name,
                                        usage=usage))
        except (UpstreamError, OpenAIError) as exc:
            error = upstream_error(exc) if isinstance(exc, UpstreamError) else exc
            await send(error.body())
        await send("[DONE]")
        await response.write_eof()
        return response


def _ending(last: pb.GenerateChunk | None) -> tuple[str, Usage]:
    """The finish reason and usage of a request whose last chunk is `last`."""
    if last is None or last.finish_reason not in FINISH_REASON:
        raise OpenAIError(503, "the worker ended the request without finishing it "
                          "(aborted: stopping or draining)", type_="service_unavailable_error",
                          headers={"Retry-After": RETRY_AFTER_S})
    timing = last.timing
    return FINISH_REASON[last.finish_reason], Usage(
        timing.num_prompt_tokens, timing.num_output_tokens, timing.num_cached_tokens)
