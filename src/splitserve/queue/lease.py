"""Lease renewals and declines on core NATS request/reply (`splitserve.lease.<id>`).

A prefill worker working on a job asks the job's decode worker to extend the
attempt's lease, or declines the job (routing/lease.py has the rules). No answer
(the decode worker is away, the broker is restarting, the reply is lost) is `None`:
the prefill worker keeps the deadline it has, which the fence already allows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from splitserve.queue.errors import MalformedMessage
from splitserve.queue.messages import decode_lease_reply, decode_lease_request
from splitserve.queue.subjects import lease_subject
from splitserve.rpc.jobs_pb2 import LeaseReply, LeaseRequest

log = logging.getLogger(__name__)

LeaseHandler = Callable[[LeaseRequest], Awaitable[LeaseReply]]


async def request_lease(nc: Client, decode_worker_id: str, request: LeaseRequest,
                        timeout_s: float = 1.0) -> LeaseReply | None:
    """Ask; the decode worker's reply, or None if none came in `timeout_s`."""
    if not nc.is_connected:
        return None
    try:
        msg = await nc.request(lease_subject(decode_worker_id), request.SerializeToString(),
                               timeout=timeout_s)
    except (TimeoutError, nats.errors.Error) as err:
        log.info("lease request %s:%d to %s: no answer (%r)", request.request_id,
                 request.attempt, decode_worker_id, err)
        return None
    try:
        return decode_lease_reply(msg.data)
    except MalformedMessage as err:
        log.warning("lease reply from %s dropped: %s", decode_worker_id, err)
        return None


class LeaseResponder:
    """Answers the lease requests of one decode worker with `handler`."""

    def __init__(self, handler: LeaseHandler) -> None:
        self._handler = handler
        self._sub: Subscription | None = None

    @classmethod
    async def start(cls, nc: Client, worker_id: str, handler: LeaseHandler) -> LeaseResponder:
        responder = cls(handler)
        responder._sub = await nc.subscribe(lease_subject(worker_id), cb=responder._on_msg)
        return responder

    async def _on_msg(self, msg: Msg) -> None:
        try:
            reply = await self._handler(decode_lease_request(msg.data))
        except MalformedMessage as err:
            reply = LeaseReply(granted=False, refusal=f"malformed request: {err}")
        except Exception:  # a bug costs one renewal (refused), not the worker
            log.exception("lease request on %s failed", msg.subject)
            reply = LeaseReply(granted=False, refusal="internal error")
        if msg.reply:
            try:
                await msg.respond(reply.SerializeToString())
            except nats.errors.Error as err:
                log.info("lease reply not sent: %r", err)

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error as err:
                log.debug("lease unsubscribe failed: %r", err)
            self._sub = None
