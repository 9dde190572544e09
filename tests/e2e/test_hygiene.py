"""Queue and registry hygiene over real daemons: no offload without a prefill worker, a
garbage registry entry does not blind the decode worker, a job with invalid page ids
is terminated once (not re-prefilled), a prefill worker with a skewed clock gets
no more jobs, and a slow ack holds no pages. Counters come from Admin/GetStatus (grpcurl), never from log text."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from cluster import admin_status as status
from cluster import generate, nats_server, start_daemon, stop_daemons, wait_ready, worker_config
from nats.js.errors import NoKeysError
from test_faults import expected_outputs, long_prompts, wait_no_leaks

from splitserve.config.daemon import FaultConfig, LeaseConfig
from splitserve.queue.connection import connect
from splitserve.queue.subjects import BUCKET_WORKERS, STREAM_PREFILL
from splitserve.queue.work_queue import publish_job
from splitserve.rpc.jobs_pb2 import PrefillJob

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LEASE = LeaseConfig(base_s=5.0, per_token_ms=2.0, skew_margin_s=0.3)


def _counter(address: str, name: str) -> int:
    return int(status(address)["counters"].get(name, 0))


async def _broker_call(url: str, action: str, job: PrefillJob | None = None) -> int:
    broker = await connect(url, name="test")
    try:
        if action == "garbage":
            kv = await broker.js.key_value(BUCKET_WORKERS)
            await kv.put("garbage-0", b"\xff\x00 not a WorkerDescriptor")
            return 0
        if action == "publish":
            assert job is not None
            return await publish_job(broker.js, job)
        info = await broker.js.stream_info(STREAM_PREFILL)
        return int(info.state.messages)
    finally:
        await broker.close()


def _wait_counter(address: str, name: str, value: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _counter(address, name) < value:
        assert time.monotonic() < deadline, status(address)
        time.sleep(0.2)


def test_no_prefill_worker_garbage_entry_and_invalid_page_ids(tmp_path, smollm,
                                                              smollm_engine) -> None:
    broker = nats_server(tmp_path)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url, lease=LEASE), tmp_path)
    daemons = [decode]
    try:
        wait_ready(daemons)
        prompts = long_prompts(smollm.tokenizer, 4)
        expected = expected_outputs(smollm_engine, prompts)
        # 1. No prefill worker registered: local at once, nothing published.
        started = time.monotonic()
        tokens, last = generate(decode.address, prompts[0], 8)
        assert tokens == expected[0]
        assert (last.timing.prefill, last.timing.num_attempts) == ("local", 1)
        assert time.monotonic() - started < LEASE.base_s
        assert asyncio.run(_broker_call(broker.url, "count")) == 0
        # 2. A garbage registry entry, then a prefill worker joins: the decode worker's
        # watch skips the entry and still sees the worker.
        asyncio.run(_broker_call(broker.url, "garbage"))
        prefill = start_daemon(worker_config("prefill", "prefill-0", broker.url, lease=LEASE),
                               tmp_path)
        daemons.append(prefill)
        wait_ready([prefill])
        deadline = time.monotonic() + 20
        for prompt, want in zip(prompts[1:], expected[1:]):
            tokens, last = generate(decode.address, prompt, 8)
            assert tokens == want
            if last.timing.prefill == "remote":
                break
            assert time.monotonic() < deadline
            time.sleep(1.0)
        assert last.timing.prefill == "remote", "the prefill worker was never used"
        # 3. A job whose landing pages lie outside the destination's pool is a permanent
        # error: terminated once, never re-prefilled.
        incarnation = status(decode.address)["incarnation"]
        job = PrefillJob(request_id="crafted", attempt=1, token_ids=prompts[0][:50],
                         priority="normal", dest_worker_id="decode-0",
                         dest_page_ids=[1_000_000 + i for i in range(4)],
                         lease_deadline_unix_ns=time.time_ns() + 30 * 10**9,
                         dest_incarnation=incarnation)
        job.sampling.max_tokens = 1
        asyncio.run(_broker_call(broker.url, "publish", job))
        _wait_counter(prefill.address, "num_rejected_jobs", 1)
        time.sleep(2.0)  # a nak would have redelivered it by now (nak_delay_s 0.5)
        assert _counter(prefill.address, "num_rejected_jobs") == 1
        assert asyncio.run(_broker_call(broker.url, "count")) == 0
        assert _counter(decode.address, "num_stale_notifications") == 0
        wait_no_leaks(decode.address)
    finally:
        stop_daemons(daemons)
        broker.stop()


@pytest.mark.parametrize("offset_s,counter", [(2.0, None), (-2.0, "num_clock_skew_jobs")])
def test_prefill_worker_with_a_skewed_clock_gets_no_more_jobs(tmp_path, smollm, smollm_engine,
                                                              offset_s, counter) -> None:
    """Ahead: the decode worker measures it from KVReady timestamps and stops sending
    it jobs. Behind (the dangerous side: its lease checks run late): it refuses every
    job it can prove it is behind for, and never writes."""
    broker = nats_server(tmp_path)
    daemons = [
        start_daemon(worker_config("decode", "decode-0", broker.url, lease=LEASE), tmp_path),
        start_daemon(worker_config("prefill", "prefill-0", broker.url, lease=LEASE,
                                   faults=FaultConfig(clock_offset_s=offset_s)), tmp_path)]
    decode, prefill = daemons
    try:
        wait_ready(daemons)
        prompts = long_prompts(smollm.tokenizer, 3)
        expected = expected_outputs(smollm_engine, prompts)
        tokens, last = generate(decode.address, prompts[0], 8)
        assert tokens == expected[0]
        if counter is None:
            assert last.timing.prefill == "remote", decode.log_tail()
            [clock] = status(decode.address)["peer_clocks"]
            assert clock["worker_id"] == "prefill-0" and clock["excluded"], clock
            assert clock["offset_min_ms"] > 1000, clock
            remote_before = _counter(prefill.address, "num_remote_prefills")
            tokens, last = generate(decode.address, prompts[1], 8)
            assert tokens == expected[1]
            assert (last.timing.prefill, last.timing.num_attempts) == ("local", 1)
            assert _counter(prefill.address, "num_remote_prefills") == remote_before
        else:
            assert _counter(prefill.address, counter) >= 1
            assert _counter(prefill.address, "num_remote_prefills") == 0
            tokens, _ = generate(decode.address, prompts[1], 8)
            assert tokens == expected[1]
        wait_no_leaks(decode.address, timeout_s=30.0)
    finally:
        stop_daemons(daemons)
        broker.stop()


def test_engine_thread_death_fails_loudly(tmp_path, smollm) -> None:
    """The engine thread dies (a test-only fault hook): the in-flight client gets
    UNAVAILABLE, the worker leaves the registry and exits with status 1, so systemd's
    Restart=on-failure restarts it."""
    broker = nats_server(tmp_path)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url,
                                        faults=FaultConfig(crash_engine_after_steps=3)),
                          tmp_path)
    try:
        wait_ready([decode])
        assert asyncio.run(_registered(broker.url)) == ["decode-0"]
        with pytest.raises(grpc.RpcError) as err:
            generate(decode.address, smollm.tokenizer.encode("Count to ten."), 16)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert decode.exit_code() == 1
        assert asyncio.run(_registered(broker.url)) == []
    finally:
        stop_daemons([decode])
        broker.stop()


async def _registered(url: str) -> list[str]:
    broker = await connect(url, name="test")
    try:
        kv = await broker.js.key_value(BUCKET_WORKERS)
        try:
            return sorted(await kv.keys())
        except NoKeysError:
            return []
    finally:
        await broker.close()


def test_prefill_worker_frees_a_jobs_pages_before_its_ack(tmp_path, smollm, smollm_engine
                                                          ) -> None:
    """An ack can retry for seconds (a broker electing a stream leader: here the
    test-only `ack_delay_s`); the job's pages are written by then and go back at once,
    so a slow ack holds no KV memory, only the job's slot."""
    broker = nats_server(tmp_path)
    daemons = [
        start_daemon(worker_config("decode", "decode-0", broker.url, lease=LEASE), tmp_path),
        start_daemon(worker_config("prefill", "prefill-0", broker.url, lease=LEASE,
                                   faults=FaultConfig(ack_delay_s=4.0)), tmp_path)]
    decode, prefill = daemons
    try:
        wait_ready(daemons)
        [prompt] = long_prompts(smollm.tokenizer, 1)
        tokens, last = generate(decode.address, prompt, 8)
        assert tokens == expected_outputs(smollm_engine, [prompt])[0]
        assert last.timing.prefill == "remote", decode.log_tail()
        seen = []  # (jobs not yet acked, pages in use) while the ack waits
        while (s := status(prefill.address)).get("num_in_flight", 0):
            seen.append(int(s.get("num_pages_used", 0)))
            time.sleep(0.2)
        assert seen and set(seen) == {0}, seen  # in the ack's window, and nothing held
        assert _counter(prefill.address, "num_remote_prefills") == 1
        assert asyncio.run(_broker_call(broker.url, "count")) == 0  # acked: left the stream
        wait_no_leaks(decode.address, timeout_s=30.0)
        wait_no_leaks(prefill.address)
    finally:
        stop_daemons(daemons)
        broker.stop()
