"""A grpc.aio server for daemons that are not workers (router, planner): their own
services plus health and reflection, with the same TLS and auth guard as the workers'
(control/server.py), so `grpcurl list` and health probes work the same everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.control.errors import BindError
from splitserve.control.health import HealthStatus
from splitserve.control.server import (
    HEALTH_SERVICE,
    ExtraService,
    ServerSecurity,
    is_loopback,
    server_credentials,
    server_options,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceServer:
    server: grpc.aio.Server
    health: HealthStatus
    address: str  # host:port actually bound


async def start_service_server(address: str, services: Sequence[ExtraService],
                               security: ServerSecurity) -> ServiceServer:
    """Bind `address` ("host:0": a free port), add `services`, health and reflection,
    start. Gated services follow `health.set_serving`. BindError when it cannot bind."""
    server = grpc.aio.server(interceptors=security.interceptors(), options=server_options())
    for service in services:
        service.add_to_server(server)
    health = HealthStatus([s.name for s in services if s.gated],
                          [s.name for s in services if not s.gated], True)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [*(s.name for s in services), HEALTH_SERVICE, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    try:
        port = (server.add_secure_port(address, server_credentials(security.tls))
                if security.tls.enabled else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise BindError(address, str(exc)) from exc
    await server.start()
    host = address.rsplit(":", 1)[0]
    if not security.guarded and not is_loopback(host):
        log.warning("gRPC server on %s:%d without auth: anyone who can reach it can call "
                    "%s", host, port, ", ".join(s.name for s in services))
    return ServiceServer(server, health, f"{host}:{port}")
