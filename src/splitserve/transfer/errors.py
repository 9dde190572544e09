"""Errors of the KV transfer layer; each carries the data needed to act on it."""

from __future__ import annotations

from collections.abc import Sequence

from splitserve.errors import SplitserveError


class TransferError(SplitserveError):
    """Base class for errors raised by `splitserve.transfer`."""


class DescriptorMismatch(TransferError):
    """A peer's `WorkerDescriptor` is incompatible with ours: refused at first contact."""

    def __init__(self, field: str, local: object, remote: object, peer_id: str = "") -> None:
        who = f" with peer {peer_id!r}" if peer_id else ""
        super().__init__(f"descriptor mismatch{who} on {field}: local={local!r} remote={remote!r}")
        self.field = field
        self.local = local
        self.remote = remote
        self.peer_id = peer_id


class InvalidDescriptor(TransferError):
    """A peer's descriptor is malformed or its NIXL metadata cannot be loaded."""

    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"invalid descriptor for peer {peer_id!r}: {reason}")
        self.peer_id = peer_id
        self.reason = reason


class UnknownPeer(TransferError):
    """A transfer names a peer this agent is not connected to (call `connect` first)."""

    def __init__(self, peer_id: str) -> None:
        super().__init__(f"not connected to peer {peer_id!r}; connect from its descriptor first")
        self.peer_id = peer_id


class InvalidPageIds(TransferError, ValueError):
    """Page ids are out of range, duplicated or of unequal length; nothing was posted."""

    def __init__(self, request_id: str, reason: str, page_ids: Sequence[int] = ()) -> None:
        super().__init__(f"request {request_id}: invalid page ids: {reason}")
        self.request_id = request_id
        self.reason = reason
        self.page_ids = list(page_ids)


class TransferFailed(TransferError):
    """A posted page transfer did not complete: peer gone, timeout or a NIXL error.

    `page_ids` are the remote (destination) page ids the transfer addressed; their
    content on the peer is undefined and must not be used.
    """

    def __init__(self, request_id: str, page_ids: Sequence[int], reason: str) -> None:
        super().__init__(
            f"request {request_id}: transfer of {len(page_ids)} pages failed: {reason}"
        )
        self.request_id = request_id
        self.page_ids = list(page_ids)
        self.reason = reason
