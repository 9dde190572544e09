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


class RoleSwitchBusy(SplitserveError):
    """Another role switch is running on this worker (→ FAILED_PRECONDITION)."""

    def __init__(self, current_role: str, requested_role: str) -> None:
        super().__init__(f"a role switch is running on this worker (now {current_role}); "
                         "retry once it is done")
        self.current_role = current_role
        self.requested_role = requested_role


class RoleSwitchUnsupported(SplitserveError):
    """This daemon has no role to switch (router, planner, a local server) (→
    FAILED_PRECONDITION)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cannot switch roles: {reason}")
        self.reason = reason


class RoleUnavailable(SplitserveError):
    """A call this worker's current role does not serve, e.g. Generate on a prefill
    worker (→ UNAVAILABLE: the client retries on another worker)."""

    def __init__(self, role: str, request_id: str = "") -> None:
        super().__init__(f"this worker is a {role} worker now and serves no Generate calls; "
                         "retry on a decode worker")
        self.role = role
        self.request_id = request_id
