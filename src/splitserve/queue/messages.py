"""Encode and decode the messages of jobs.proto, checking what the receiver relies on.

Protobuf parses many garbage byte strings without error (unknown fields, empty
messages), so decoding also validates the fields a receiver acts on: a job with no
request id or no landing pages is malformed, not a job.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError, Message

from splitserve.engine.sampling import SamplingParams
from splitserve.queue.errors import InvalidSubjectToken, MalformedMessage
from splitserve.queue.subjects import validate_priority, validate_role, validate_worker_id
from splitserve.rpc.jobs_pb2 import (
    KVCacheEvents,
    KVReady,
    LeaseReply,
    LeaseRequest,
    PrefillJob,
    WorkerStats,
)

__all__ = [
    "KVCacheEvents", "KVReady", "PrefillJob", "WorkerStats", "decode_job", "decode_kv_events",
    "decode_kv_ready", "decode_stats", "encode_job", "encode_kv_ready", "encode_stats",
    "first_token_params", "job_msg_id", "job_sampling", "validate_job",
]


def job_sampling(params: SamplingParams) -> PrefillJob.SamplingParams:
    """A request's sampling, as its prefill job carries it."""
    sampling = PrefillJob.SamplingParams(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids))
    if params.seed is not None:
        sampling.seed = params.seed
    return sampling


def first_token_params(sampling: PrefillJob.SamplingParams) -> SamplingParams:
    """What a prefill worker samples a job's first token with: the request's sampling,
    one token, EOS not checked (the decode worker judges the token)."""
    return SamplingParams(max_tokens=1, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k,
                          seed=sampling.seed if sampling.HasField("seed") else None,
                          ignore_eos=True)


def _check_request_id(type_name: str, request_id: str) -> None:
    if not request_id:
        raise MalformedMessage(type_name, "empty request_id")
    if any(ch.isspace() or not ch.isprintable() for ch in request_id):
        raise MalformedMessage(type_name, f"request_id {request_id!r} has whitespace or "
                               "control characters")


def _check_token(type_name: str, check: Callable[[str], str], value: str) -> None:
    try:
        check(value)
    except InvalidSubjectToken as err:
        raise MalformedMessage(type_name, str(err)) from None


def validate_job(job: PrefillJob) -> PrefillJob:
    """Raise MalformedMessage unless `job` can be acted on; return it otherwise."""
    name = "PrefillJob"
    _check_request_id(name, job.request_id)
    if job.attempt < 1:
        raise MalformedMessage(name, f"request {job.request_id}: attempt must be >= 1")
    if not job.token_ids:
        raise MalformedMessage(name, f"request {job.request_id}: no token_ids")
    if job.num_cached_tokens >= len(job.token_ids):
        raise MalformedMessage(name, f"request {job.request_id}: num_cached_tokens "
                               f"{job.num_cached_tokens} leaves nothing of {len(job.token_ids)}"
                               " tokens to prefill")
    if not job.dest_page_ids:
        raise MalformedMessage(name, f"request {job.request_id}: no dest_page_ids")
    if job.lease_deadline_unix_ns <= 0:
        raise MalformedMessage(name, f"request {job.request_id}: no lease deadline")
    _check_token(name, validate_priority, job.priority)
    _check_token(name, validate_worker_id, job.dest_worker_id)
    return job


def job_msg_id(job: PrefillJob) -> str:
    """The JetStream de-duplication id: one stored message per request attempt."""
    return f"{job.request_id}:{job.attempt}"


def _parse(message: Message, data: bytes) -> None:
    try:
        message.ParseFromString(data)
    except (DecodeError, ValueError) as err:
        raise MalformedMessage(type(message).__name__, f"protobuf decode failed: {err}") from None


def encode_job(job: PrefillJob) -> bytes:
    return validate_job(job).SerializeToString()


def decode_job(data: bytes) -> PrefillJob:
    job = PrefillJob()
    _parse(job, data)
    return validate_job(job)


def encode_kv_ready(ready: KVReady) -> bytes:
    _validate_kv_ready(ready)
    return ready.SerializeToString()


def decode_kv_ready(data: bytes) -> KVReady:
    ready = KVReady()
    _parse(ready, data)
    _validate_kv_ready(ready)
    return ready


def _validate_kv_ready(ready: KVReady) -> None:
    _check_request_id("KVReady", ready.request_id)
    if ready.attempt < 1:
        raise MalformedMessage("KVReady", f"request {ready.request_id}: attempt must be >= 1")
    _check_token("KVReady", validate_worker_id, ready.prefill_worker_id)


def encode_stats(stats: WorkerStats) -> bytes:
    _validate_stats(stats)
    return stats.SerializeToString()


def decode_stats(data: bytes) -> WorkerStats:
    stats = WorkerStats()
    _parse(stats, data)
    _validate_stats(stats)
    return stats


def _validate_stats(stats: WorkerStats) -> None:
    _check_token("WorkerStats", validate_worker_id, stats.worker_id)
    _check_token("WorkerStats", validate_role, stats.role)


PAGE_HASH_BYTES = 16  # engine/page_allocator.py: blake2b with digest_size=16


def decode_kv_events(data: bytes) -> KVCacheEvents:
    events = KVCacheEvents()
    _parse(events, data)
    _check_token("KVCacheEvents", validate_worker_id, events.worker_id)
    if events.page_size < 1:
        raise MalformedMessage("KVCacheEvents", "page_size must be >= 1")
    if any(len(h) != PAGE_HASH_BYTES for h in (*events.stored, *events.removed)):
        raise MalformedMessage("KVCacheEvents", f"page hashes are {PAGE_HASH_BYTES} bytes")
    return events


def decode_lease_request(data: bytes) -> LeaseRequest:
    request = LeaseRequest()
    _parse(request, data)
    _check_request_id("LeaseRequest", request.request_id)
    if request.attempt < 1:
        raise MalformedMessage("LeaseRequest", "attempt must be >= 1")
    if not request.decline and request.wanted_deadline_unix_ns <= 0:
        raise MalformedMessage("LeaseRequest", "an extension needs wanted_deadline_unix_ns")
    return request


def decode_lease_reply(data: bytes) -> LeaseReply:
    reply = LeaseReply()
    _parse(reply, data)
    return reply
