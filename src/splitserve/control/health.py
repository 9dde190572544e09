"""The standard `grpc.health.v1.Health` service, flipped by drain and shutdown.

While draining, the overall status ("") and the admitting services (Generation)
report NOT_SERVING, so load balancers and `grpc_health_probe` stop sending new
work; Admin stays SERVING so the worker can still be inspected and resumed. A gated
service can also be disabled on its own (`set_enabled`): a worker whose current role
serves no Generate calls (prefill) reports Generation NOT_SERVING while "" serves.

Our own servicer rather than `grpc_health.v1.health.aio.HealthServicer`: its
setter is a coroutine, and a signal handler or a synchronous start-up step must be
able to flip the status at once (the next Check sees it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

OVERALL = ""
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthStatus(health_pb2_grpc.HealthServicer):
    """Check/Watch over a status per service; `gated` ones follow `set_serving`."""

    def __init__(self, gated: Sequence[str], always_serving: Sequence[str],
                 serving: bool = True) -> None:
        self.gated = (OVERALL, *gated)
        self.always_serving = tuple(always_serving)
        self._status = dict.fromkeys(self.always_serving, _SERVING)
        self._disabled: set[str] = set()  # gated services NOT_SERVING whatever the state
        self._changed = asyncio.Event()  # replaced after each change; watchers wait on it
        self._shut_down = False
        self.serving = not serving  # so the first call below logs and applies
        self.set_serving(serving)

    def set_serving(self, serving: bool) -> None:
        """SERVING / NOT_SERVING for "" and the gated services (no-op after shutdown)."""
        if self._shut_down:
            return
        if serving != self.serving:
            log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        self.serving = serving
        self._update_gated()

    def set_enabled(self, service: str, enabled: bool) -> None:
        """Disable (NOT_SERVING whatever `set_serving` says) or re-enable one gated
        service (no-op after shutdown)."""
        if service not in self.gated or service == OVERALL:
            raise ValueError(f"{service!r} is not a gated service: {self.gated}")
        if (service not in self._disabled) != enabled:
            log.info("health: %s %s", service, "enabled" if enabled else "disabled")
        if enabled:
            self._disabled.discard(service)
        else:
            self._disabled.add(service)
        if not self._shut_down:
            self._update_gated()

    def _update_gated(self) -> None:
        on = [s for s in self.gated if self.serving and s not in self._disabled]
        off = [s for s in self.gated if s not in on]
        for services, status in ((on, _SERVING), (off, _NOT_SERVING)):
            if services:
                self._update(services, status)

    def shutdown(self) -> None:
        """Every service NOT_SERVING for good (the server is stopping)."""
        self.serving = False
        self._update((*self.gated, *self.always_serving), _NOT_SERVING)
        self._shut_down = True

    def _update(self, services: Sequence[str], status: int) -> None:
        for service in services:
            self._status[service] = status  # type: ignore[assignment]
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- grpc.health.v1.Health ----------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, _UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await changed.wait()
