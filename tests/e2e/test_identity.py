"""Identity under faults: incarnations fence a decode worker restarted under the same id,
and a repeated caller request id is refused without touching the first request.

Each test compares output token for token with the single-process engine and reads
the workers' counters through Admin/GetStatus (grpcurl), not their logs."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cluster import admin_status as status
from cluster import generate, nats_server, start_daemon, stop_daemons, wait_ready, worker_config
from test_faults import expected_outputs, long_prompts, wait_no_leaks

from splitserve.config.daemon import LeaseConfig
from splitserve.engine.sampling import SamplingParams
from splitserve.rpc import generation_pb2, generation_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
# Long enough that the dead worker's jobs are still within their lease when the
# prefill worker takes them after the restart: only the incarnation can fence them.
LONG_LEASE = LeaseConfig(base_s=40.0, per_token_ms=0.0, skew_margin_s=0.3)


async def _num_jobs(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("SPLITSERVE_PREFILL")
        return int(info.state.messages)
    finally:
        await nc.close()


def _wait_for_jobs(url: str, num_jobs: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while asyncio.run(_num_jobs(url)) < num_jobs:
        assert time.monotonic() < deadline, "jobs were not published"
        time.sleep(0.1)


def _counter(address: str, name: str) -> int:
    return int(status(address)["counters"].get(name, 0))


def test_decode_restart_under_the_same_id_with_queued_jobs_and_a_concurrent_victim(
        tmp_path, smollm, smollm_engine) -> None:
    """A decode worker dies with prefill jobs queued and restarts under the same
    worker_id, as systemd's Restart=on-failure does. Its new life hands the same page
    ids to a new request (the victim). The queued jobs, still within their lease, must
    never be written into those pages: the victim's tokens equal the single process's."""
    broker = nats_server(tmp_path)
    decode_config = worker_config("decode", "decode-0", broker.url, lease=LONG_LEASE)
    decode = start_daemon(decode_config, tmp_path)
    prefill = start_daemon(worker_config("prefill", "prefill-0", broker.url, lease=LONG_LEASE),
                           tmp_path)
    daemons = [decode, prefill]
    try:
        wait_ready(daemons)
        doomed = long_prompts(smollm.tokenizer, 2)
        # The reference first: between the jobs' publication and SIGCONT below only the
        # restart may pass, well within their 40 s lease even on a loaded box.
        victim = smollm.tokenizer.encode("Write a long story about a lighthouse keeper.")
        params = {"max_tokens": 96, "ignore_eos": True}
        [expected] = smollm_engine().generate(
            [victim], SamplingParams(max_tokens=96, temperature=0, ignore_eos=True))
        prefill.signal(signal.SIGSTOP)  # the jobs stay queued
        with ThreadPoolExecutor(2) as pool:
            lost = [pool.submit(generate, decode.address, p, 8, 60.0) for p in doomed]
            _wait_for_jobs(broker.url, 2)
            decode.signal(signal.SIGKILL)
            for future in lost:
                with pytest.raises(grpc.RpcError):
                    future.result()
        decode.process.wait()
        decode = start_daemon(decode_config, tmp_path)  # same id, same port, new life
        daemons.append(decode)
        wait_ready([decode])
        # The victim is prefilled locally and decodes for a while in the first pages
        # of the fresh pool: exactly where the dead life's landing pages were.
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(generate, decode.address, victim, timeout_s=120.0, **params)
            time.sleep(1.0)  # streaming now
            prefill.signal(signal.SIGCONT)  # takes the dead life's jobs at once
            tokens, last = future.result()
        assert last.timing.prefill == "local"
        assert tokens == expected
        deadline = time.monotonic() + 30
        while _counter(prefill.address, "num_incarnation_mismatches") < 2:
            assert time.monotonic() < deadline, status(prefill.address)
            time.sleep(0.2)
        assert _counter(prefill.address, "num_incarnation_mismatches") == 2
        assert _counter(prefill.address, "num_remote_prefills") == 0  # nothing was written
        assert asyncio.run(_num_jobs(broker.url)) == 0  # terminated, not left to redeliver
        assert _counter(decode.address, "num_stale_notifications") == 0
        # The new life serves remote prefills as usual.
        fresh = long_prompts(smollm.tokenizer, 3)[2]
        tokens, last = generate(decode.address, fresh, 8)
        assert tokens == expected_outputs(smollm_engine, [fresh])[0]
        assert last.timing.prefill == "remote"
        wait_no_leaks(decode.address, timeout_s=60.0)
    finally:
        stop_daemons(daemons)
        broker.stop()


def test_duplicate_caller_id_gets_already_exists_and_the_first_finishes(
        tmp_path, smollm, smollm_engine) -> None:
    broker = nats_server(tmp_path)
    daemons = [start_daemon(worker_config("decode", "decode-0", broker.url), tmp_path),
               start_daemon(worker_config("prefill", "prefill-0", broker.url), tmp_path)]
    decode = daemons[0]
    try:
        wait_ready(daemons)
        [long_prompt] = long_prompts(smollm.tokenizer, 1)  # remote: the job is in flight
        [expected] = expected_outputs(smollm_engine, [long_prompt], max_tokens=32)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(generate, decode.address, long_prompt, 32,
                                request_id="same-id")
            deadline = time.monotonic() + 30
            while int(status(decode.address).get("num_in_flight", 0)) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with grpc.insecure_channel(decode.address) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(generation_pb2.GenerateRequest(
                        token_ids=long_prompt[:50], max_tokens=4, request_id="same-id"),
                        timeout=30))
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
            tokens, last = first.result()
        assert tokens == expected
        assert last.request_id == "same-id"
        s = status(decode.address)
        assert int(s["counters"]["num_duplicate_ids"]) == 1
        assert int(s["counters"].get("num_requests_finished", 0)) == 1
        # The id is free again once the first request finished, and its job is not
        # mistaken for the first one's (Msg-Ids use the internal id: reusing a caller id
        # within the broker's duplicate window used to drop the job and wait a lease).
        tokens, last = generate(decode.address, long_prompt[:50], 4, request_id="same-id")
        assert len(tokens) == 4 and last.request_id == "same-id"
        assert (last.timing.prefill, last.timing.num_attempts) == ("remote", 1)
        assert int(status(decode.address)["counters"].get("num_duplicate_publishes", 0)) == 0
        wait_no_leaks(decode.address)
    finally:
        stop_daemons(daemons)
        broker.stop()
