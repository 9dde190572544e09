"""Encoding and validation of jobs.proto messages (no broker needed)."""

from __future__ import annotations

import pytest
from test_queue_work import make_job

from splitserve.queue.errors import MalformedMessage
from splitserve.queue.messages import (
    KVReady,
    decode_job,
    decode_kv_ready,
    decode_stats,
    encode_job,
    encode_kv_ready,
    job_msg_id,
)


def test_kv_ready_roundtrip() -> None:
    ready = KVReady(request_id="req-1", attempt=2, first_token=0, prefill_worker_id="prefill-0",
                    dequeue_time_unix_ns=1, prefill_start_unix_ns=2, prefill_end_unix_ns=3)
    assert decode_kv_ready(encode_kv_ready(ready)) == ready


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [("request_id", "", "empty request_id"), ("request_id", "a b", "whitespace"),
     ("attempt", 0, "attempt"), ("prefill_worker_id", "p.0", "worker id")],
)
def test_invalid_kv_ready_is_malformed(field: str, value: object, reason: str) -> None:
    ready = KVReady(request_id="req-1", attempt=1, prefill_worker_id="prefill-0")
    setattr(ready, field, value)
    with pytest.raises(MalformedMessage) as info:
        decode_kv_ready(ready.SerializeToString())
    assert info.value.message_type == "KVReady" and reason in info.value.reason


def test_job_roundtrip_and_msg_id() -> None:
    job = make_job("req-7", attempt=3)
    assert decode_job(encode_job(job)) == job
    assert job_msg_id(job) == "req-7:3"


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b""])
def test_garbage_is_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_job(payload)
    with pytest.raises(MalformedMessage):
        decode_stats(payload)
