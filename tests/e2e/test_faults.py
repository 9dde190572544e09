"""Faults: a dead or frozen prefill worker, a dead decode worker, a restarted broker,
bad input. Each checks output against the single-process engine and that no page
leaks once the leases have expired."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cluster import admin_status as status
from cluster import (
    generate,
    nats_server,
    start_daemon,
    stop_daemons,
    wait_no_leaks,
    wait_ready,
    worker_config,
)

from splitserve.config.daemon import LeaseConfig
from splitserve.engine.sampling import SamplingParams
from splitserve.rpc import generation_pb2, generation_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
LEASE = LeaseConfig(base_s=3.0, per_token_ms=2.0, skew_margin_s=0.3)


@pytest.fixture
def cluster(tmp_path):
    broker = nats_server(tmp_path)
    daemons = []

    def start(role: str, worker_id: str, **overrides):
        overrides.setdefault("lease", LEASE)
        d = start_daemon(worker_config(role, worker_id, broker.url, **overrides), tmp_path)
        daemons.append(d)
        return d

    decode = start("decode", "decode-0")
    prefill = start("prefill", "prefill-0")
    wait_ready([decode, prefill])
    yield {"broker": broker, "decode": decode, "prefill": prefill, "start": start}
    stop_daemons(daemons)
    broker.stop()


def long_prompts(tokenizer, n: int, words: int = 250) -> list[list[int]]:
    return [tokenizer.encode(f"Document {i}. " + " ".join(["alpha beta gamma delta"] * (
        words // 4)) + f" Summary {i}:") for i in range(n)]


def expected_outputs(smollm_engine, prompts, max_tokens=8):
    return smollm_engine().generate(prompts, SamplingParams(max_tokens=max_tokens,
                                                            temperature=0))


def counter(address: str, name: str) -> int:
    return int(status(address)["counters"].get(name, 0))


def run_concurrently(address: str, prompts, max_tokens=8):
    with ThreadPoolExecutor(len(prompts)) as pool:
        return [t for t, _ in pool.map(lambda p: generate(address, p, max_tokens), prompts)]


def test_prefill_killed_mid_job_requests_complete_via_fallback(cluster, smollm,
                                                               smollm_engine) -> None:
    prompts = long_prompts(smollm.tokenizer, 4)
    expected = expected_outputs(smollm_engine, prompts)
    address = cluster["decode"].address
    killer = threading.Timer(0.5, lambda: cluster["prefill"].signal(signal.SIGKILL))
    killer.start()
    got = run_concurrently(address, prompts)
    assert got == expected
    s = wait_no_leaks(address)
    assert int(s["counters"].get("num_fallbacks", 0)) >= 1, s


def test_prefill_killed_fallback_before_long_lease(tmp_path, smollm, smollm_engine) -> None:
    """With a 60 s lease, a crashed prefill worker is noticed when its registry
    entry expires (15 s TTL), not when the lease runs out."""
    broker = nats_server(tmp_path)
    long_lease = LeaseConfig(base_s=60.0, per_token_ms=0.0, skew_margin_s=0.3)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url, lease=long_lease),
                          tmp_path)
    prefill = start_daemon(worker_config("prefill", "prefill-0", broker.url, lease=long_lease),
                           tmp_path)
    try:
        wait_ready([decode, prefill])
        prompts = long_prompts(smollm.tokenizer, 1)
        expected = expected_outputs(smollm_engine, prompts)
        prefill.signal(signal.SIGSTOP)  # takes no job...
        prefill.signal(signal.SIGKILL)  # ...and dies without deregistering
        started = time.monotonic()
        tokens, last = generate(decode.address, prompts[0], 8)
        assert tokens == expected[0]
        assert last.timing.num_attempts == 2
        # 60 s lease, done in < 40 s: attempt 1 failed when the worker left the registry
        assert time.monotonic() - started < 40.0
        assert counter(decode.address, "num_fallbacks") == 1
    finally:
        stop_daemons([decode, prefill])
        broker.stop()


def test_prefill_frozen_past_lease_then_resumed(cluster, smollm, smollm_engine) -> None:
    prompts = long_prompts(smollm.tokenizer, 3)
    expected = expected_outputs(smollm_engine, prompts)
    address, prefill = cluster["decode"].address, cluster["prefill"]
    prefill.signal(signal.SIGSTOP)
    try:
        # each waits out attempt 1's lease, then attempt 2's (the frozen worker is
        # still registered), then prefills locally
        got = run_concurrently(address, prompts)
    finally:
        prefill.signal(signal.SIGCONT)
    assert got == expected
    s = wait_no_leaks(address)
    assert int(s["counters"].get("num_fallbacks", 0)) == 6, s
    # the resumed worker must not write into anyone's pages: its jobs expired and
    # are terminated; afterwards it serves new jobs normally
    deadline = time.monotonic() + 20
    while counter(prefill.address, "num_expired_jobs") < 1:
        assert time.monotonic() < deadline, prefill.log_tail()
        time.sleep(0.2)
    assert counter(prefill.address, "num_remote_prefills") == 0
    fresh = long_prompts(smollm.tokenizer, 4)[3]  # not in the prefix cache
    tokens, last = generate(address, fresh, 8)
    assert tokens == expected_outputs(smollm_engine, [fresh])[0]
    assert last.timing.prefill == "remote"
    wait_no_leaks(address)


def test_second_attempt_lands_after_the_first_lease_ran_out(cluster, smollm,
                                                           smollm_engine) -> None:
    [prompt] = long_prompts(smollm.tokenizer, 1, words=200)
    [expected] = expected_outputs(smollm_engine, [prompt])
    decode, prefill = cluster["decode"], cluster["prefill"]
    prefill.signal(signal.SIGSTOP)  # attempt 1 runs out of lease while it is queued
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(generate, decode.address, prompt, 8)
        deadline = time.monotonic() + 30
        try:
            while counter(decode.address, "num_fallbacks") < 1:  # attempt 1 failed
                assert time.monotonic() < deadline, decode.log_tail()
                time.sleep(0.1)
        finally:
            prefill.signal(signal.SIGCONT)  # terminates attempt 1, serves attempt 2
        tokens, last = result.result(timeout=60)
    assert tokens == expected
    assert (last.timing.prefill, last.timing.num_attempts) == ("remote", 2)
    s = wait_no_leaks(decode.address)
    assert int(s["counters"].get("num_fallbacks", 0)) == 1, s
    assert counter(prefill.address, "num_expired_jobs") == 1  # attempt 1, terminated


def test_decode_killed_mid_stream_client_gets_unavailable(cluster, smollm) -> None:
    prompt = long_prompts(smollm.tokenizer, 1)[0]
    decode, prefill = cluster["decode"], cluster["prefill"]
    with grpc.insecure_channel(decode.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.Generate(generation_pb2.GenerateRequest(
            token_ids=prompt, max_tokens=400, temperature=0.0, ignore_eos=True), timeout=60)
        next(stream)
        decode.signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5.0
    # the prefill worker is unaffected: still answering, and serves a new decode worker
    assert status(prefill.address)["state"].endswith("SERVING")
    new_decode = cluster["start"]("decode", "decode-1")
    wait_ready([new_decode])
    tokens, last = generate(new_decode.address, prompt, 4)
    assert last.timing.prefill == "remote" and len(tokens) == 4


def test_broker_restart_with_queued_jobs(cluster, smollm, smollm_engine, tmp_path) -> None:
    prompts = long_prompts(smollm.tokenizer, 3)
    expected = expected_outputs(smollm_engine, prompts)
    address, prefill, broker = cluster["decode"].address, cluster["prefill"], cluster["broker"]
    prefill.signal(signal.SIGSTOP)  # jobs stay queued
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(generate, address, p, 8) for p in prompts]
        time.sleep(1.0)
        broker.stop()
        time.sleep(0.5)
        broker.start()
        prefill.signal(signal.SIGCONT)
        got = [f.result()[0] for f in futures]
    assert got == expected
    wait_no_leaks(address)
    # both workers reconnected: a new request is prefilled remotely again
    fresh = long_prompts(smollm.tokenizer, 6)[3:]  # not in the prefix cache
    fresh_expected = expected_outputs(smollm_engine, fresh)
    for prompt, want in zip(fresh, fresh_expected):
        tokens, last = generate(address, prompt, 8)
        assert tokens == want
        if last.timing.prefill == "remote":
            break
        time.sleep(1.0)
    assert last.timing.prefill == "remote", "no remote prefill after the broker restart"


def test_bad_input_is_rejected_and_publishes_nothing(cluster, smollm) -> None:
    address = cluster["decode"].address
    cases = [
        ({"text": ""}, "prompt"),
        ({"token_ids": [1] * 8190, "max_tokens": 10}, "max_tokens"),
        ({"text": "hi", "max_tokens": 0}, "max_tokens"),
        ({"text": "hi", "temperature": -1.0}, "temperature"),
        ({"text": "hi", "top_p": 2.0}, "top_p"),
        ({"text": "x" * (5 << 20)}, "prompt"),
    ]
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 16 << 20)]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for fields, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=30))
            assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.RESOURCE_EXHAUSTED), fields
            assert field in err.value.details(), (fields, err.value.details())
    assert asyncio.run(num_stream_messages(cluster["broker"].url)) == 0
    s = status(address)
    assert int(s["counters"].get("num_remote_prefills", 0)) == 0
    tokens, _ = generate(address, smollm.tokenizer.encode("Still serving?"), 4)
    assert len(tokens) == 4


async def num_stream_messages(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("SPLITSERVE_PREFILL")
        return int(info.state.messages) + int(info.state.first_seq) - 1 if info.state.messages \
            else int(info.state.last_seq)
    finally:
        await nc.close()
