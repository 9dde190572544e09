"""Errors raised by the messaging layer; each carries the data needed to act on it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

import nats.errors
from nats.js.errors import APIError

from splitserve.errors import SplitserveError
from splitserve.redact import redact_url

# What a broker call raises when the broker is slow, restarting or electing a leader:
# worth retrying, never a reason for a daemon to exit.
TRANSIENT_BROKER_ERRORS = (nats.errors.Error, APIError, asyncio.TimeoutError)


class InvalidSubjectToken(SplitserveError):
    """A worker id, priority or role cannot be used as one NATS subject token."""

    def __init__(self, kind: str, value: str, reason: str) -> None:
        super().__init__(f"invalid {kind} {value!r}: {reason}")
        self.kind = kind
        self.value = value
        self.reason = reason


class BrokerError(SplitserveError):
    """Base for failures of the broker process or of the connection to it."""


class BrokerStartError(BrokerError):
    """`nats-server` did not start or did not accept connections in time."""

    def __init__(self, port: int, store_dir: Path, reason: str, stderr_tail: Sequence[str]) -> None:
        tail = "\n".join(stderr_tail) if stderr_tail else "(no output)"
        super().__init__(
            f"nats-server on port {port} (store {store_dir}) failed: {reason}\n"
            f"last stderr lines:\n{tail}"
        )
        self.port = port
        self.store_dir = store_dir
        self.reason = reason
        self.stderr_tail = tuple(stderr_tail)


class BrokerUnavailable(BrokerError):
    """No connection to any broker URL within the allowed time."""

    def __init__(self, servers: Sequence[str], waited_s: float) -> None:
        shown = [redact_url(server) for server in servers]
        super().__init__(f"no NATS broker reachable at {shown} after {waited_s:.1f}s")
        self.servers = tuple(shown)
        self.waited_s = waited_s


class ConnectionClosed(BrokerError):
    """The NATS connection was closed on purpose; queue objects bound to it are done."""


class QueueSetupError(BrokerError):
    """A stream, consumer or bucket could not be created."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        super().__init__(f"cannot create {kind} {name!r}: {reason}")
        self.kind = kind
        self.name = name
        self.reason = reason


class ConfigMismatch(QueueSetupError):
    """An existing stream, consumer or bucket differs from the wanted settings and the
    broker refused to update it. `settings` maps setting name -> (existing, wanted)."""

    def __init__(
        self, kind: str, name: str, settings: Mapping[str, tuple[object, object]], reason: str
    ) -> None:
        diffs = ", ".join(f"{k}: existing={old!r} wanted={new!r}" for k, (old, new) in settings.items())
        BrokerError.__init__(
            self, f"{kind} {name!r} has different settings ({diffs}); update refused: {reason}"
        )
        self.kind = kind
        self.name = name
        self.settings = dict(settings)
        self.reason = reason


class MalformedMessage(SplitserveError):
    """A payload is not a valid message of the expected type."""

    def __init__(self, message_type: str, reason: str) -> None:
        super().__init__(f"malformed {message_type}: {reason}")
        self.message_type = message_type
        self.reason = reason


class PublishFailed(BrokerError):
    """A prefill job could not be stored in the stream before the publish deadline."""

    def __init__(self, request_id: str, attempt: int, subject: str, reason: str) -> None:
        super().__init__(f"request {request_id} attempt {attempt}: publish to {subject} failed: {reason}")
        self.request_id = request_id
        self.attempt = attempt
        self.subject = subject
        self.reason = reason


class QueueFull(PublishFailed):
    """The prefill stream is at `max_msgs` or `max_bytes` and refused the job
    (discard=new); `limit` is the broker's description of the limit hit. Not
    retried: a full queue does not drain in a publish deadline, and the decode
    worker prefilling locally is what relieves it."""

    def __init__(self, request_id: str, attempt: int, subject: str, limit: str) -> None:
        super().__init__(request_id, attempt, subject, f"prefill queue full ({limit})")
        self.limit = limit


class DuplicateJob(PublishFailed):
    """The stream already held a job with this `<request_id>:<attempt>` Msg-Id,
    stored within the duplicate window by a publish that was not this call's (a
    request id or attempt reused): this job was NOT stored, and the one at
    `stream_seq` may carry other landing pages. A PublishFailed, because for the
    caller the outcome is the same: this attempt has no remote prefill."""

    def __init__(self, request_id: str, attempt: int, stream_seq: int, subject: str) -> None:
        super().__init__(request_id, attempt, subject,
                         f"duplicate Msg-Id: the stream already holds it at seq {stream_seq}")
        self.stream_seq = stream_seq


class InvalidKVValue(SplitserveError):
    """A value cannot be stored under a key of a KV bucket."""

    def __init__(self, bucket: str, key: str, reason: str) -> None:
        super().__init__(f"bucket {bucket}, key {key!r}: {reason}")
        self.bucket = bucket
        self.key = key
        self.reason = reason


class JobAlreadySettled(SplitserveError):
    """A job delivery was acked, nak-ed or terminated twice (a bug in the caller)."""

    def __init__(self, request_id: str, attempt: int, verb: str) -> None:
        super().__init__(f"request {request_id} attempt {attempt}: {verb} on a job already "
                         "acked, nak-ed or terminated")
        self.request_id = request_id
        self.attempt = attempt
        self.verb = verb


class PolicyConflict(SplitserveError):
    """A compare-and-set policy write lost: the key is no longer at the expected revision."""

    def __init__(self, key: str, expected_revision: int, current_revision: int) -> None:
        super().__init__(f"policy {key}: expected revision {expected_revision}, "
                         f"found {current_revision}")
        self.key = key
        self.expected_revision = expected_revision
        self.current_revision = current_revision


class PolicyBucketMissing(SplitserveError):
    """The policy bucket does not exist on this broker: no worker has connected yet."""

    def __init__(self, bucket: str) -> None:
        super().__init__(f"bucket {bucket} does not exist on this broker (a worker creates "
                         "it when it first connects)")
        self.bucket = bucket
