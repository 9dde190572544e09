"""`splitserve.v1.Generation` over any `GenerationService`.

Life cycle of one Generate call:
0. grpc hands over the request parsed by `parse_generate_request`: bytes that are
   no GenerateRequest (e.g. a string that is not UTF-8) arrive as a marker and get
   INVALID_ARGUMENT, where grpc's own parser would end the call with UNKNOWN.
1. Check the caller's request id or assign one; send it as initial metadata, so
   the client knows it even when the call fails.
2. Draining → UNAVAILABLE at once (the client retries on another worker).
3. Convert the proto (wire-level checks) and open the service's stream; typed
   errors raised before or while streaming become status codes (`status.py`).
4. Write each chunk as it comes. If the client cancels (or its deadline passes),
   grpc cancels this task: the service's stream is closed on the way out, which
   aborts the request in the engine and frees its KV pages.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, Protocol, cast

import grpc

from splitserve.control.convert import (
    UndecodableRequest,
    chunk_to_proto,
    parse_generate_request,
    request_from_proto,
)
from splitserve.control.errors import Draining
from splitserve.control.status import REQUEST_ID_KEY, status_for
from splitserve.control.tracker import RequestTracker
from splitserve.engine.errors import InvalidRequest
from splitserve.ingress import GenerationChunk, GenerationService, check_request_id
from splitserve.rpc import generation_pb2 as pb
from splitserve.rpc import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, service: GenerationService, is_draining: Callable[[], bool], *,
                 tracker: RequestTracker | None = None) -> None:
        self.service = service
        self.is_draining = is_draining
        self.tracker = tracker or RequestTracker()

    async def Generate(self, request: pb.GenerateRequest | UndecodableRequest,
                       context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, UndecodableRequest):
            await self._fail(context, request.error(), "")
        try:
            # Validated first: it goes into metadata, which refuses control characters.
            request_id = check_request_id(request.request_id)
        except InvalidRequest as exc:
            await self._fail(context, exc, "")
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        with self.tracker.track():
            try:
                await self._generate(request, request_id, context)
            except asyncio.CancelledError:
                log.info("request %s: cancelled (client gone, deadline or server stop)",
                         request_id)
                raise
            except Exception as exc:  # noqa: BLE001 - every failure gets a deliberate code
                await self._fail(context, exc, request_id)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: Exception,
                    request_id: str) -> NoReturn:
        status = status_for(exc, request_id)
        if status.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            self.tracker.record_reject()
        log.info("request %s: %s %s", request_id or "-", status.code.name, status.message)
        await context.abort(status.code, status.message, status.trailing_metadata(request_id))
        raise AssertionError("context.abort returned")  # it always raises

    async def _generate(self, request: pb.GenerateRequest, request_id: str,
                        context: grpc.aio.ServicerContext) -> None:
        if self.is_draining():
            raise Draining(request_id)
        # The protocol's `async def generate` reads as a coroutine to a type checker;
        # implementations are async generators. Accept both.
        result: object = self.service.generate(request_from_proto(request, request_id))
        if inspect.isawaitable(result):
            result = await result
        stream = cast(AsyncIterator[GenerationChunk], result)
        num_chunks = 0
        try:
            async for chunk in stream:
                await context.write(chunk_to_proto(chunk))
                num_chunks += 1
        finally:
            # Leaving early (cancel, write failure) closes the service's stream now,
            # not at garbage collection, so the request is aborted at once.
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        log.debug("request %s: done after %d chunks", request_id, num_chunks)


class GenerateHandler(Protocol):
    """Anything that serves Generate: this module's servicer, the router's forwarder."""

    async def Generate(self, request: pb.GenerateRequest | UndecodableRequest,
                       context: grpc.aio.ServicerContext) -> None: ...


def add_generation_servicer(servicer: GenerateHandler, server: grpc.aio.Server) -> None:
    """`add_GenerationServicer_to_server`, with `parse_generate_request` as the request
    deserializer (see step 0 of the module docstring)."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=parse_generate_request,
        response_serializer=pb.GenerateChunk.SerializeToString)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(GENERATION_SERVICE, handlers),))
    server.add_registered_method_handlers(GENERATION_SERVICE, handlers)
