"""The one place where splitserve's typed errors become gRPC status codes.

| error | status |
|---|---|
| `DuplicateRequest` | ALREADY_EXISTS |
| `InvalidRequest`, `ConfigError`, `InvalidSubjectToken` | INVALID_ARGUMENT |
| `CapacityExceeded` (request can never fit; routing's overload rejects derive from it) | RESOURCE_EXHAUSTED |
| `Draining`, `RoleUnavailable`, `EngineStopped`, `BrokerError` (broker down, …) | UNAVAILABLE |
| `ReloadUnsupported` (no config file), `RoleSwitchBusy`, `RoleSwitchUnsupported` | FAILED_PRECONDITION |
| `TimeoutError` | DEADLINE_EXCEEDED |
| anything else | INTERNAL, logged with its traceback |

UNKNOWN is never produced on purpose: a handler that lets an exception escape
gets UNKNOWN from grpc, so servicers route every exception through `status_for`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from splitserve.control.errors import (
    Draining,
    ReloadUnsupported,
    RoleSwitchBusy,
    RoleSwitchUnsupported,
    RoleUnavailable,
)
from splitserve.engine.async_engine import EngineStopped
from splitserve.engine.errors import CapacityExceeded, DuplicateRequest, InvalidRequest
from splitserve.errors import ConfigError
from splitserve.queue.errors import BrokerError, InvalidSubjectToken

log = logging.getLogger(__name__)

# Trailing metadata keys that carry the structured part of an error.
FIELD_KEY = "splitserve-field"
REQUEST_ID_KEY = "splitserve-request-id"


@dataclass(frozen=True)
class RpcStatus:
    code: grpc.StatusCode
    message: str
    field: str | None = None  # the offending request field, for INVALID_ARGUMENT

    def trailing_metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        items = []
        if self.field:
            items.append((FIELD_KEY, self.field))
        if request_id:
            items.append((REQUEST_ID_KEY, request_id))
        return tuple(items)


def status_for(exc: BaseException, request_id: str = "") -> RpcStatus:
    """Status code and one-line message for `exc`; unexpected errors are logged here."""
    if isinstance(exc, DuplicateRequest):
        return RpcStatus(grpc.StatusCode.ALREADY_EXISTS, exc.message, exc.field)
    if isinstance(exc, InvalidRequest):
        return _invalid(exc.field, exc.message)
    if isinstance(exc, ConfigError):
        return _invalid(exc.field, str(exc))
    if isinstance(exc, InvalidSubjectToken):
        return _invalid(exc.kind, str(exc))
    if isinstance(exc, CapacityExceeded):
        return RpcStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, _one_line(str(exc)))
    if isinstance(exc, Draining | RoleUnavailable | EngineStopped | BrokerError):
        return RpcStatus(grpc.StatusCode.UNAVAILABLE, _one_line(str(exc)))
    if isinstance(exc, ReloadUnsupported | RoleSwitchBusy | RoleSwitchUnsupported):
        return RpcStatus(grpc.StatusCode.FAILED_PRECONDITION, _one_line(str(exc)))
    if isinstance(exc, TimeoutError):
        return RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED,
                         _one_line(str(exc)) or "deadline exceeded")
    log.error("request %s: unexpected %s", request_id or "-", type(exc).__name__,
              exc_info=exc)
    where = f" (request {request_id})" if request_id else ""
    return RpcStatus(grpc.StatusCode.INTERNAL,
                     f"internal error{where}: {type(exc).__name__}; see the worker log")


def _invalid(field: str, message: str) -> RpcStatus:
    message = _one_line(message)
    if field not in message:
        message = f"{field}: {message}"
    return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def _one_line(message: str) -> str:
    return " ".join(message.split())
