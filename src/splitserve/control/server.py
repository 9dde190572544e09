"""One grpc.aio server per daemon: Generation (decode workers), Admin, health, reflection.

Every server enables reflection and the standard health service, so
`grpcurl -plaintext host:port list` works without proto files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.control.admin import AdminServicer, drain, resume
from splitserve.control.backend import AdminBackend
from splitserve.control.errors import BindError
from splitserve.control.generation import (
    GENERATION_SERVICE,
    GenerationServicer,
    add_generation_servicer,
)
from splitserve.control.health import HealthStatus
from splitserve.ingress import GenerationService
from splitserve.rpc import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

# Above the default 4 MiB so that a prompt past the ingress limit (1 MiB characters,
# up to 4 MiB of UTF-8) reaches validation and gets INVALID_ARGUMENT naming the
# field, not a transport-level RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 8 << 20

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class ExtraService:
    """Another servicer on the same server (e.g. Planner): its full name and adder."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    gated: bool = False  # NOT_SERVING in health while draining


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    address: str  # host:port actually bound (port 0 resolved)
    port: int
    health: HealthStatus
    admin: AdminBackend

    def set_serving(self, serving: bool) -> None:
        """Health of "" and Generation; requests are refused only by a drain."""
        self.health.set_serving(serving)

    async def drain(self, grace_s: float) -> str:
        """What Admin.Drain does; for SIGTERM handlers."""
        return await drain(self.admin, self.health, grace_s)

    async def resume(self) -> str:
        return await resume(self.admin, self.health)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING, refuse new calls, give open ones `grace_s`, then cancel them."""
        log.info("gRPC server %s stopping (grace %.1fs)", self.address, grace_s)
        self.health.shutdown()
        await self.server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_server(
    address: str,
    generation: GenerationService | None,
    admin: AdminBackend,
    *,
    extra: Sequence[ExtraService] = (),
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    serving: bool = True,
) -> GrpcServer:
    """Bind `address` ("host:0" picks a free port), register the services, start.

    `generation` is None on daemons that do not serve requests (prefill, planner).
    `serving=False` starts with health NOT_SERVING, for daemons that finish their
    start-up (broker, registration) before calling `set_serving(True)`.
    Raises BindError when the address cannot be bound.
    """
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpc sets SO_REUSEPORT by default: a second worker configured with the same
        # port would silently share it (the kernel splitting calls between the two).
        ("grpc.so_reuseport", 0),
    ])
    gated, always = [], [ADMIN_SERVICE]
    if generation is not None:
        # Not generation_pb2_grpc's adder: undecodable bytes must be INVALID_ARGUMENT.
        add_generation_servicer(
            GenerationServicer(generation, admin.is_draining, tracker=admin.tracker), server)
        gated.append(GENERATION_SERVICE)
    for service in extra:
        service.add_to_server(server)
        (gated if service.gated else always).append(service.name)
    health = HealthStatus(gated, always, serving and not admin.is_draining())
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(admin, health), server)
    names = [*gated, *always, HEALTH_SERVICE, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)

    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise BindError(address, str(exc)) from exc
    host = address.rsplit(":", 1)[0]
    bound = f"{host}:{port}"
    await server.start()
    log.info("gRPC server on %s: %s", bound, ", ".join(names))
    return GrpcServer(server, bound, port, health, admin)
