"""Errors raised by the control plane itself (the rest come from the layers it serves)."""

from __future__ import annotations

from splitserve.errors import SplitserveError


class Draining(SplitserveError):
    """This worker is draining or stopping and admits no new request (→ UNAVAILABLE)."""

    def __init__(self, request_id: str) -> None:
        super().__init__("worker is draining and admits no new requests; retry on another worker")
        self.request_id = request_id


class BindError(SplitserveError):
    """The gRPC server cannot listen on the address it was given."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


class ReloadUnsupported(SplitserveError):
    """This daemon has no config file to reload (→ FAILED_PRECONDITION)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot reload: {reason}")
        self.reason = reason
