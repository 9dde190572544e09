"""One grpc.aio server per daemon: Generation (workers), Admin, health, reflection.

Every server enables reflection and the standard health service, so
`grpcurl -plaintext host:port list` works without proto files (`-cacert ca.pem`
instead of `-plaintext` on a TLS server). With `grpc_tls` the port is TLS (mutual with
a client CA); with `auth` (or mTLS) every call passes the guard of control/auth.py. A
server on a non-loopback address with neither logs a warning: anyone who reaches it
can drive it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitserve.config.security import AuthConfig, TlsConfig
from splitserve.control.admin import AdminServicer, drain, resume
from splitserve.control.auth import AuthInterceptor, Guard
from splitserve.control.backend import AdminBackend
from splitserve.control.errors import BindError
from splitserve.control.generation import (
    GENERATION_SERVICE,
    GenerationServicer,
    add_generation_servicer,
)
from splitserve.control.health import HealthStatus
from splitserve.errors import ConfigError
from splitserve.ingress import GenerationService
from splitserve.rpc import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

# Above the default 4 MiB so that a prompt past the ingress limit (1 MiB characters,
# up to 4 MiB of UTF-8) reaches validation and gets INVALID_ARGUMENT naming the
# field, not a transport-level RESOURCE_EXHAUSTED.
MAX_MESSAGE_BYTES = 8 << 20

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """grpc.aio.server options of every daemon."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # grpc sets SO_REUSEPORT by default: a second worker configured with the same
        # port would silently share it (the kernel splitting calls between the two).
        ("grpc.so_reuseport", 0),
        # A router pings its workers (RouterConfig.keepalive_s, 1 s at the most often)
        # to find a frozen one; grpc's default answers pings on an idle stream (a health
        # watch) more often than every 5 min with GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ]


@dataclass(frozen=True)
class ExtraService:
    """Another servicer on the same server (e.g. Planner): its full name and adder."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    gated: bool = False  # NOT_SERVING in health while draining


@dataclass(frozen=True)
class ServerSecurity:
    """TLS and auth of one server (both off: plaintext, open)."""

    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    # told the code of each refused call, on the event loop (the daemon's metrics count them)
    on_refusal: Callable[[grpc.StatusCode], None] | None = None

    @property
    def guarded(self) -> bool:
        return self.auth.enabled or self.tls.mutual

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The auth check of every call, when there is anything to check."""
        if not self.guarded:
            return []
        return [AuthInterceptor(Guard(self.auth, self.tls), self.on_refusal)]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """ConfigError naming a file that cannot be read."""
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))],
        root_certificates=_read(tls.client_ca_file) if tls.mutual else None,
        require_client_auth=tls.mutual)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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

    def set_generation_enabled(self, enabled: bool) -> None:
        """Health of Generation follows the worker's role: NOT_SERVING on a prefill
        worker (its Generate calls get UNAVAILABLE), whatever `set_serving` says."""
        self.health.set_enabled(GENERATION_SERVICE, enabled)

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
    security: ServerSecurity = ServerSecurity(),
) -> GrpcServer:
    """Bind `address` ("host:0" picks a free port), register the services, start.

    `generation` is None on daemons that never serve requests (planner); a worker
    passes its role switch, whose Generate refuses calls while it is a prefill worker
    (`set_generation_enabled(False)` then says so in health).
    `serving=False` starts with health NOT_SERVING, for daemons that finish their
    start-up (broker, registration) before calling `set_serving(True)`.
    Raises BindError when the address cannot be bound, ConfigError when a TLS or
    tokens file cannot be read or parsed.
    """
    credentials = server_credentials(security.tls) if security.tls.enabled else None
    server = grpc.aio.server(interceptors=security.interceptors(),
                             options=server_options(max_message_bytes))
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
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:
        raise BindError(address, str(exc)) from exc
    host = address.rsplit(":", 1)[0]
    bound = f"{host}:{port}"
    await server.start()
    log.info("gRPC server on %s (%s, %s): %s", bound,
             ("mTLS" if security.tls.mutual else "TLS") if credentials else "plaintext",
             "auth on" if security.guarded else "auth off", ", ".join(names))
    if not security.guarded and not is_loopback(host):
        log.warning("gRPC server on %s without auth: anyone who can reach it can drive "
                    "it (Drain, Reload, GetConfig); set auth.tokens_file or "
                    "grpc_tls.client_ca_file, or bind 127.0.0.1", bound)
    return GrpcServer(server, bound, port, health, admin)
