"""The router's gRPC server: `splitserve.v1.Generation`, forwarded, plus health and
reflection (so `grpcurl list` works), with the same TLS and API keys as the workers.

Life cycle of a forwarded Generate call: bytes that are no GenerateRequest →
INVALID_ARGUMENT; the caller's request id is checked (or one assigned) and sent as
initial metadata; the request goes to a worker unchanged (forward.py) and its chunks
come back unchanged; a worker's error status, message and field come back as they
were; the caller cancelling cancels the worker's call.
"""

from __future__ import annotations

import contextlib
import logging

import grpc

from splitserve.control.convert import UndecodableRequest
from splitserve.control.generation import GENERATION_SERVICE, add_generation_servicer
from splitserve.control.health import HealthStatus
from splitserve.control.server import ExtraService, ServerSecurity
from splitserve.control.service_server import start_service_server
from splitserve.control.status import REQUEST_ID_KEY
from splitserve.engine.errors import InvalidRequest
from splitserve.ingress import check_request_id
from splitserve.router.forward import Forwarder, UpstreamError
from splitserve.rpc import generation_pb2 as pb

log = logging.getLogger(__name__)



class ForwardingGeneration:
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    async def Generate(self, request: pb.GenerateRequest | UndecodableRequest,
                       context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
            return
        try:
            request_id = check_request_id(request.request_id)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        forwarded = pb.GenerateRequest()
        forwarded.CopyFrom(request)
        forwarded.request_id = request_id
        await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            async with contextlib.aclosing(self.forwarder.stream(forwarded)) as chunks:
                async for chunk in chunks:
                    await context.write(chunk)
        except UpstreamError as exc:
            log.info("request %s: %s from %s", request_id, exc, exc.worker_id or "router")
            await context.abort(exc.code, exc.details, exc.trailing)


async def start_router_grpc(address: str, forwarder: Forwarder, security: ServerSecurity
                            ) -> tuple[grpc.aio.Server, HealthStatus, str]:
    """Bind and start; returns the server, its health and the bound address."""
    servicer = ForwardingGeneration(forwarder)
    started = await start_service_server(address, [ExtraService(
        GENERATION_SERVICE, lambda server: add_generation_servicer(servicer, server),
        gated=True)], security)
    return started.server, started.health, started.address
