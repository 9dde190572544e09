"""One NIXL agent (UCX backend) per worker: registration, peers, page writes, notifications.

Life cycle:

1. Startup: `TransferAgent(worker_id, pool, model_fingerprint)` registers the whole
   page pool once and builds `descriptor`, which the daemon publishes.
2. First contact: the writer calls `connect(peer_descriptor)`; compatibility is
   checked, the peer's NIXL metadata is loaded and cached by worker id. Calling it
   again with the same descriptor is free, so callers may call it before each write.
3. Write: `write_pages` (or `write_pages_async`) posts one one-sided WRITE whose
   descriptors are the coalesced page runs, with the notification attached; NIXL
   delivers the notification after the data.
4. Receive: the receiver polls `poll_notifications` / awaits `wait_notifications`.
   Polling also drives UCX progress: connection setup from new writers, and the
   flush that completes a writer's notified write (a writer's completion waits for
   the receiver's next poll), so a receiving worker must keep a waiter running.
5. Failure: a failed or timed-out write releases its handle, counts a failure,
   drops the peer (reconnect from a fresh descriptor) and raises `TransferFailed`;
   other peers are unaffected. Test-only: `fail_every=N` makes every N-th write fail
   so before anything is posted (no data lands), counted and handled as a real
   failure; the chaos suite sets it from `WorkerConfig.faults.fail_transfer_every`.

The agent is not meant to be shared across threads: use it from the event loop
(the NIXL agent itself is created in strict thread-sync mode, so misuse is safe,
just serialized).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Self

from nixl_cu12._api import nixl_xfer_handle

from splitserve.engine.kv_pool import KVPool
from splitserve.rpc.worker_pb2 import WorkerDescriptor
from splitserve.transfer.coalesce import coalesce_page_runs, format_page_ids, validate_page_ids
from splitserve.transfer.counters import TransferCounters
from splitserve.transfer.descriptor import (
    PoolLayout,
    build_descriptor,
    check_compatible,
    layout_from_descriptor,
)
from splitserve.transfer.errors import InvalidDescriptor, TransferError, TransferFailed, UnknownPeer
from splitserve.transfer.nixl_agent import NIXL_ERRORS, new_nixl_agent
from splitserve.transfer.polling import MAX_DELAY_S, Backoff

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
_SPIN_S = 0.0002  # yield without sleeping this long after a post (see polling.py)


@dataclass(frozen=True)
class _Peer:
    peer_id: str
    descriptor: WorkerDescriptor
    layout: PoolLayout


@dataclass
class _InFlight:
    """One posted WRITE, between `_post` and completion."""

    request_id: str
    peer_id: str
    remote_page_ids: list[int]
    handle: nixl_xfer_handle
    num_bytes: int
    num_descriptors: int
    started_s: float
    deadline_s: float
    state: str


class TransferAgent:
    """Moves KV pages of `pool` (`[num_pages, num_layers, 2, page_size, kv_heads, head_dim]`)
    to and from peers by page id, over NIXL's UCX backend; CPU or GPU memory alike.
    """

    def __init__(
        self,
        worker_id: str,
        pool: KVPool,
        model_fingerprint: str,
        role: str = "",
        grpc_address: str = "",
        fail_every: int = 0,
    ) -> None:
        if not worker_id:
            raise ValueError("worker_id must be non-empty: it names the NIXL agent")
        if fail_every < 0:
            raise ValueError(f"fail_every must be >= 0, got {fail_every}")
        self.worker_id = worker_id
        self.fail_every = fail_every  # test-only fault injection, 0: never (see above)
        self._num_writes = 0  # writes that passed validation, for `fail_every`
        self.pool = pool
        self.counters = TransferCounters()
        self._layout = PoolLayout.of_pool(pool)
        self._nixl = new_nixl_agent(worker_id)
        if "UCX" not in self._nixl.backends:
            raise TransferError(f"worker {worker_id}: NIXL has no UCX backend")
        # Registration happens once, for the whole pool: pages are then addressed
        # by offset and no transfer pays a registration.
        try:
            self._registration = self._nixl.register_memory(pool.tensor, backends=["UCX"])
        except NIXL_ERRORS as exc:
            raise TransferError(f"worker {worker_id}: registering the KV pool failed: {exc!r}")
        self._peers: dict[str, _Peer] = {}
        self._closed = False
        self.descriptor = build_descriptor(
            worker_id,
            pool,
            self._layout,
            model_fingerprint,
            self._nixl.get_agent_metadata(),
            role=role,
            grpc_address=grpc_address,
        )
        log.info(
            "transfer agent %s: registered %d pages of %d bytes (%s, %d MiB)",
            worker_id, pool.num_pages, self._layout.bytes_per_page, self._layout.mem_type,
            self._layout.num_bytes >> 20,
        )

    # -- peers -------------------------------------------------------------

    def connect(self, descriptor: WorkerDescriptor) -> str:
        """Connect to the worker `descriptor` describes; returns its peer id.

        Cached per peer: the same descriptor again is a dictionary lookup; a changed
        one (the peer restarted) replaces the old connection. Raises
        `DescriptorMismatch` or `InvalidDescriptor`.
        """
        self._check_open()
        peer_id = descriptor.worker_id
        cached = self._peers.get(peer_id)
        if cached is not None:
            if _transport_fields(cached.descriptor) == _transport_fields(descriptor):
                # Same agent and pool (role or gRPC address may have changed): keep
                # the connection, and any writes in flight on it.
                self._peers[peer_id] = _Peer(peer_id, _copy(descriptor), cached.layout)
                return peer_id
            log.info("peer %s: agent or pool changed (restart?), reconnecting", peer_id)
            self.disconnect(peer_id)
        if peer_id == self.worker_id:
            raise InvalidDescriptor(peer_id, "a worker does not connect to itself")
        check_compatible(self.descriptor, descriptor)
        layout = layout_from_descriptor(descriptor)
        try:
            name = self._nixl.add_remote_agent(descriptor.agent_metadata)
        except NIXL_ERRORS as exc:
            raise InvalidDescriptor(peer_id, f"NIXL refused the agent metadata: {exc!r}") from exc
        agent_name = name.decode() if isinstance(name, bytes) else str(name)
        if agent_name != peer_id:
            self._forget_remote(agent_name)
            raise InvalidDescriptor(peer_id, f"agent metadata names agent {agent_name!r}")
        self._peers[peer_id] = _Peer(peer_id, _copy(descriptor), layout)
        log.info(
            "peer %s: connected (%d pages of %d bytes, %s)",
            peer_id, layout.num_pages, layout.bytes_per_page, layout.mem_type,
        )
        return peer_id

    def disconnect(self, peer_id: str) -> None:
        """Forget a peer; a later `connect` from a fresh descriptor starts over."""
        if self._peers.pop(peer_id, None) is not None:
            self._forget_remote(peer_id)
            log.info("peer %s: disconnected", peer_id)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._peers

    @property
    def peer_ids(self) -> list[str]:
        return sorted(self._peers)

    # -- writes ------------------------------------------------------------

    def write_pages(
        self,
        peer_id: str,
        local_page_ids: Sequence[int],
        remote_page_ids: Sequence[int],
        notification: bytes,
        request_id: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Write local pages into the peer's pages (pairwise) and attach `notification`.

        One descriptor per contiguous run of page ids. The peer receives
        `notification` after the data; an empty one sends none (for all but the last
        part of a multi-part write). With a notification, completion takes a round
        trip through the peer's next poll (NIXL flushes before notifying).
        Returns once the write is complete. Raises `InvalidPageIds` (nothing
        posted), `UnknownPeer`, or `TransferFailed`.
        """
        inflight = self._post(peer_id, local_page_ids, remote_page_ids, notification, request_id,
                              timeout_s)
        backoff = Backoff(min_delay_s=0.00005, max_delay_s=0.001, spin_s=_SPIN_S)
        while not self._advance(inflight):
            backoff.sleep(inflight.deadline_s - time.monotonic())

    async def write_pages_async(
        self,
        peer_id: str,
        local_page_ids: Sequence[int],
        remote_page_ids: Sequence[int],
        notification: bytes,
        request_id: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """`write_pages` that yields to the event loop while the write completes.

        Posting itself runs inline: over UCX's CMA transport (CPU memory, one host)
        the copy happens in the posting call, ~1.3 ms for 12 MiB.
        """
        inflight = self._post(peer_id, local_page_ids, remote_page_ids, notification, request_id,
                              timeout_s)
        backoff = Backoff(spin_s=_SPIN_S)
        while not self._advance(inflight):
            await backoff.sleep_async(inflight.deadline_s - time.monotonic())

    def _post(
        self,
        peer_id: str,
        local_page_ids: Sequence[int],
        remote_page_ids: Sequence[int],
        notification: bytes,
        request_id: str,
        timeout_s: float,
    ) -> _InFlight:
        self._check_open()
        peer = self._peers.get(peer_id)
        if peer is None:
            raise UnknownPeer(peer_id)
        local_ids, remote_ids = validate_page_ids(
            request_id, local_page_ids, remote_page_ids, self.pool.num_pages, peer.layout.num_pages
        )
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._num_writes += 1
        if self.fail_every and self._num_writes % self.fail_every == 0:
            self._fail_unposted(request_id, peer_id, remote_ids,
                                f"injected fault (test-only): write {self._num_writes}")
        runs = coalesce_page_runs(local_ids, remote_ids)
        started_s = time.monotonic()
        try:
            local = self._nixl.get_xfer_descs(self._layout.run_rows(runs, side=0),
                                              self._layout.mem_type)
            remote = self._nixl.get_xfer_descs(peer.layout.run_rows(runs, side=1),
                                               peer.layout.mem_type)
            handle = self._nixl.initialize_xfer("WRITE", local, remote, peer_id,
                                                bytes(notification))
        except NIXL_ERRORS as exc:
            self._fail_unposted(request_id, peer_id, remote_ids, f"prepare: {exc!r}")
        inflight = _InFlight(
            request_id=request_id,
            peer_id=peer_id,
            remote_page_ids=remote_ids,
            handle=handle,
            num_bytes=len(local_ids) * self._layout.bytes_per_page,
            num_descriptors=len(runs),
            started_s=started_s,
            deadline_s=started_s + timeout_s,
            state="PROC",
        )
        try:
            inflight.state = self._nixl.transfer(handle)
        except NIXL_ERRORS as exc:
            self._fail(inflight, f"post: {exc!r}")
        log.debug(
            "request %s: posted %d pages in %d descriptors to %s, remote pages %s",
            request_id, len(local_ids), len(runs), peer_id, format_page_ids(remote_ids),
        )
        return inflight

    def _advance(self, inflight: _InFlight) -> bool:
        """Poll once; True when complete, raises `TransferFailed` on error or timeout."""
        if inflight.state == "PROC":
            try:
                inflight.state = self._nixl.check_xfer_state(inflight.handle)
            except NIXL_ERRORS as exc:
                self._fail(inflight, f"progress: {exc!r}")
        if inflight.state == "DONE":
            self._complete(inflight)
            return True
        if inflight.state == "ERR":
            self._fail(inflight, "NIXL reported an error state")
        if time.monotonic() >= inflight.deadline_s:
            timeout_s = inflight.deadline_s - inflight.started_s
            self._fail(inflight, f"not complete after {timeout_s:.3f} s")
        return False

    def _complete(self, inflight: _InFlight) -> None:
        elapsed_s = time.monotonic() - inflight.started_s
        inflight.handle.release()
        self.counters.record_transfer(inflight.num_bytes, inflight.num_descriptors, elapsed_s)
        log.debug(
            "request %s: wrote %d bytes to %s in %.1f us",
            inflight.request_id, inflight.num_bytes, inflight.peer_id, elapsed_s * 1e6,
        )

    def _fail(self, inflight: _InFlight, reason: str) -> NoReturn:
        try:
            inflight.handle.release()  # aborts the request if it is still active
        except NIXL_ERRORS as exc:
            log.warning("request %s: releasing failed transfer: %r", inflight.request_id, exc)
        self._fail_unposted(inflight.request_id, inflight.peer_id, inflight.remote_page_ids, reason)

    def _fail_unposted(self, request_id: str, peer_id: str, page_ids: list[int],
                       reason: str) -> NoReturn:
        self.counters.num_failures += 1
        log.warning(
            "request %s: transfer to %s failed, dropping peer; remote pages %s: %s",
            request_id, peer_id, format_page_ids(page_ids), reason,
        )
        # Any failure makes the connection suspect; the caller reconnects from the
        # peer's current descriptor, which also covers a restarted peer.
        self.disconnect(peer_id)
        raise TransferFailed(request_id, page_ids, f"peer {peer_id}: {reason}")

    # -- notifications -----------------------------------------------------

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last poll, as (peer id, message) pairs."""
        self._check_open()
        received = self._nixl.get_new_notifs()
        notes = [(str(peer), bytes(msg)) for peer, msgs in received.items() for msg in msgs]
        self.counters.num_notifications += len(notes)
        return notes

    async def wait_notifications(
        self, timeout_s: float | None = None, max_delay_s: float = MAX_DELAY_S
    ) -> list[tuple[str, bytes]]:
        """Await the next notifications, polling with backoff from 0.2 ms to `max_delay_s`.

        Returns `[]` if none arrived within `timeout_s` (None: wait indefinitely).
        Writers' completions also wait on these polls (UCX progress happens here),
        so `max_delay_s` trades idle CPU for writer-side and notification latency.
        """
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        backoff = Backoff(max_delay_s=max_delay_s)
        while True:
            notes = self.poll_notifications()
            if notes:
                return notes
            remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                return []
            await backoff.sleep_async(remaining_s)

    # -- lifetime ----------------------------------------------------------

    def close(self) -> None:
        """Drop all peers and deregister the pool; the agent is unusable afterwards."""
        if self._closed:
            return
        for peer_id in list(self._peers):
            self.disconnect(peer_id)
        try:
            self._nixl.deregister_memory(self._registration, backends=["UCX"])
        except NIXL_ERRORS as exc:
            log.warning("transfer agent %s: deregistration failed: %r", self.worker_id, exc)
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transfer agent {self.worker_id} is closed")

    def _forget_remote(self, agent_name: str) -> None:
        try:
            self._nixl.remove_remote_agent(agent_name)
        except NIXL_ERRORS as exc:
            log.warning("peer %s: invalidating NIXL metadata failed: %r", agent_name, exc)


def _copy(descriptor: WorkerDescriptor) -> WorkerDescriptor:
    copy = WorkerDescriptor()
    copy.CopyFrom(descriptor)
    return copy


def _transport_fields(descriptor: WorkerDescriptor) -> WorkerDescriptor:
    """The descriptor without the fields a daemon may change on a live agent."""
    view = _copy(descriptor)
    view.ClearField("role")
    view.ClearField("grpc_address")
    return view
