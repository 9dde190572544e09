"""Errors a request can meet in the engine; `control/` maps them to gRPC status codes."""

from __future__ import annotations

from splitserve.errors import SplitserveError


class InvalidRequest(SplitserveError):
    """The request itself is wrong (→ INVALID_ARGUMENT). `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class CapacityExceeded(SplitserveError):
    """The request is valid but can never fit this worker (→ RESOURCE_EXHAUSTED)."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


class QueueFull(CapacityExceeded):
    """The worker's queue is at its bound (`max_num_waiting`): overloaded, retry later
    (→ RESOURCE_EXHAUSTED)."""


class DuplicateRequest(InvalidRequest):
    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"request id {request_id!r} is already running")
