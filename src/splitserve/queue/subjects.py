"""Names on the broker: the prefill stream, its subjects and consumers, KV buckets,
stats subjects.

Worker ids, priorities and roles become single subject tokens, consumer names and
KV keys, so they are restricted to letters, digits, '-', '_' and '=' (the
intersection of what the three accept). A '.' would split a token in two and '*' or
'>' would turn a publish subject into a wildcard, silently routing jobs elsewhere.
"""

from __future__ import annotations

import re

from splitserve.queue.errors import InvalidSubjectToken

STREAM_PREFILL = "SPLITSERVE_PREFILL"
PREFILL_SHARED_PREFIX = "splitserve.prefill.shared"
PREFILL_DIRECT_PREFIX = "splitserve.prefill.direct"
PREFILL_SHARED_WILDCARD = f"{PREFILL_SHARED_PREFIX}.*"
PREFILL_DIRECT_WILDCARD = f"{PREFILL_DIRECT_PREFIX}.*"

BUCKET_WORKERS = "splitserve-workers"
BUCKET_POLICY = "splitserve-policy"

STATS_PREFIX = "splitserve.stats"
LEASE_PREFIX = "splitserve.lease"
KV_EVENTS_PREFIX = "splitserve.kv"

MAX_TOKEN_LEN = 128
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_=-]+$")


def validate_token(kind: str, value: str) -> str:
    """Return `value` if it is usable as one subject token, else raise InvalidSubjectToken."""
    if not isinstance(value, str):
        raise InvalidSubjectToken(kind, repr(value), f"must be a str, not {type(value).__name__}")
    if value == "":
        raise InvalidSubjectToken(kind, value, "must not be empty")
    if any(ch.isspace() for ch in value):
        raise InvalidSubjectToken(kind, value, "must not contain whitespace")
    for ch, why in ((".", "a '.' separates subject tokens"), ("*", "'*' is a wildcard"),
                    (">", "'>' is a wildcard")):
        if ch in value:
            raise InvalidSubjectToken(kind, value, f"must not contain {ch!r} ({why})")
    if len(value) > MAX_TOKEN_LEN:
        raise InvalidSubjectToken(kind, value, f"longer than {MAX_TOKEN_LEN} characters")
    if not _TOKEN_RE.match(value):
        raise InvalidSubjectToken(kind, value, "only letters, digits, '-', '_' and '=' are allowed")
    return value


def validate_worker_id(worker_id: str) -> str:
    return validate_token("worker id", worker_id)


def validate_priority(priority: str) -> str:
    return validate_token("priority", priority)


def validate_role(role: str) -> str:
    return validate_token("role", role)


def shared_subject(priority: str) -> str:
    """Subject of jobs any prefill worker may take, by QoS priority class."""
    return f"{PREFILL_SHARED_PREFIX}.{validate_priority(priority)}"


def direct_subject(worker_id: str) -> str:
    """Subject of jobs addressed to one prefill worker (e.g. for its prefix cache)."""
    return f"{PREFILL_DIRECT_PREFIX}.{validate_worker_id(worker_id)}"


def shared_consumer_name(priority: str) -> str:
    """Durable consumer shared by all prefill workers for one priority class."""
    return f"shared-{validate_priority(priority)}"


def direct_consumer_name(worker_id: str) -> str:
    """Durable consumer of one prefill worker's direct jobs."""
    return f"direct-{validate_worker_id(worker_id)}"


def stats_subject(role: str, worker_id: str) -> str:
    return f"{STATS_PREFIX}.{validate_role(role)}.{validate_worker_id(worker_id)}"


def kv_events_subject(worker_id: str) -> str:
    """Where a decode worker announces its prefix cache's changes (KVCacheEvents)."""
    return f"{KV_EVENTS_PREFIX}.{validate_worker_id(worker_id)}"


def stats_filter(role: str | None = None, worker_id: str | None = None) -> str:
    """Subscription subject for stats of one role and/or one worker; None matches any."""
    role_token = "*" if role is None else validate_role(role)
    worker_token = "*" if worker_id is None else validate_worker_id(worker_id)
    return f"{STATS_PREFIX}.{role_token}.{worker_token}"


def lease_subject(decode_worker_id: str) -> str:
    """Where a decode worker answers lease renewals and declines of its jobs."""
    return f"{LEASE_PREFIX}.{validate_worker_id(decode_worker_id)}"
