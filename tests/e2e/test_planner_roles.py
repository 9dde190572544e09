"""The planner flips a worker's role by itself (issue 13's live acceptance test).

A real broker, decode-0, decode-1 and prefill-0 as daemons, and `splitserve planner`
with the `role` actuator in `auto`. A burst of long prompts on decode-0 queues jobs
for prefill-0; the planner sees the backlog in the stats and the queue and moves the
least loaded decode worker (decode-1, idle) to prefill; when the burst is over it moves
it back. Every request finishes exactly once with the single-process engine's greedy
tokens, no page leaks on any worker, and the planner's History names both flips. Killed
(SIGKILL) at the end, the planner leaves the cluster serving as it was.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cluster import (
    GRPCURL,
    SPLITSERVE,
    admin_status,
    generate,
    nats_server,
    start_daemon,
    stop_daemons,
    wait_no_leaks,
    wait_ready,
    worker_config,
)

from splitserve.engine.sampling import SamplingParams
from splitserve.queue.broker import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORDS = ["time", "river", "light", "stone", "garden", "paper", "signal", "winter", "orbit"]
MAX_TOKENS = 8
NUM_LONG = 32


def planner_file(tmp_path: Path, nats_url: str) -> tuple[Path, str]:
    address = f"127.0.0.1:{find_free_port()}"
    config = {
        "grpc_address": address, "nats_url": nats_url, "planner_id": "planner-test",
        "mode": "auto", "interval_s": 1, "stats_max_age_s": 10, "settle_s": 2,
        "log_level": "INFO",
        "actuator": {"kind": "role", "drain_grace_s": 30, "call_timeout_s": 60},
        # a queued job is to be cleared within 0.2 s: two queued long prompts already ask
        # for more than one prefill worker; decode is judged by its SLOs alone
        "scaling": {"target_decode_tokens_per_s": 1000, "backlog_drain_s": 0.2,
                    "min_prefill": 1, "min_decode": 1, "scale_up_cooldown_s": 0,
                    "scale_down_cooldown_s": 5, "ttft_slo_ms": 600000, "tpot_slo_ms": 600000},
        "thresholds": {"enabled": False},  # retuning is tested on its own
    }
    path = tmp_path / "planner.yaml"
    path.write_text(json.dumps(config))
    return path, address


def role(address: str) -> str:
    return str(admin_status(address)["role"])


def history(address: str) -> list[str]:
    out = subprocess.run([GRPCURL, "-plaintext", "-d", "{}", address,
                          "splitserve.v1.Planner/History"], capture_output=True, text=True,
                         timeout=30, check=True)
    return [a for plan in json.loads(out.stdout).get("plans", [])
            for a in plan.get("actions", [])]


def test_a_burst_of_long_prompts_moves_a_worker_to_prefill_and_back(
        tmp_path: Path, smollm, smollm_engine) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    long = [smollm.tokenizer.encode(f"Report {i}: " + " ".join(
        rng.choice(WORDS) for _ in range(rng.randrange(150, 260)))) for i in range(NUM_LONG)]
    reference = smollm_engine().generate(long, SamplingParams(max_tokens=MAX_TOKENS,
                                                              temperature=0))
    broker = nats_server(tmp_path)
    workers = [start_daemon(worker_config(r, worker_id, broker.url), tmp_path)
               for r, worker_id in (("decode", "decode-0"), ("decode", "decode-1"),
                                    ("prefill", "prefill-0"))]
    decode0, decode1, _ = workers
    path, planner_address = planner_file(tmp_path, broker.url)
    planner_log = tmp_path / "planner.log"
    planner: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(workers)  # the planner's settle_s covers workers joining; the test
        # starts it on the whole cluster, so that its first plans are the idle ones checked
        planner = subprocess.Popen([*SPLITSERVE, "planner", "--config", str(path)],
                                   stdout=planner_log.open("wb"), stderr=subprocess.STDOUT)
        time.sleep(5)  # a few idle ticks: nothing to flip while nothing runs
        assert [role(w.address) for w in workers] == ["decode", "decode", "prefill"]

        roles_seen: set[str] = set()
        num_unavailable = 0

        def send(prompt: list[int]) -> list[int]:
            nonlocal num_unavailable
            for _ in range(3):
                try:
                    return generate(decode0.address, prompt, max_tokens=MAX_TOKENS)[0]
                except grpc.RpcError as exc:  # decode-0 is never flipped; be sure of it
                    if exc.code() is not grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                        raise
                    num_unavailable += 1
                    time.sleep(1)
            raise AssertionError("decode-0 stayed unavailable")

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, p) for p in long]
            while not all(f.done() for f in futures):
                roles_seen.add(role(decode1.address))
                time.sleep(0.5)
            results = [f.result() for f in futures]
        assert results == reference
        assert num_unavailable == 0
        assert "prefill" in roles_seen, (roles_seen, planner_log.read_text()[-4000:])

        deadline = time.monotonic() + 150  # the burst leaves the 60 s stats window
        while role(decode1.address) != "decode":
            assert time.monotonic() < deadline, planner_log.read_text()[-4000:]
            time.sleep(1)
        actions = history(planner_address)
        assert "flip decode-1 decode -> prefill" in actions, actions
        assert "flip decode-1 prefill -> decode" in actions, actions
        status = admin_status(decode1.address)
        assert int(status["counters"]["num_role_switches"]) % 2 == 0, status
        finished = sum(int(admin_status(w.address).get("counters", {}).get(
            "num_requests_finished", 0)) for w in workers)
        assert finished == NUM_LONG  # nothing lost, nothing run twice
        for w in workers:
            wait_no_leaks(w.address, timeout_s=120)
        # decode-1 serves Generate again, with the reference's tokens
        assert generate(decode1.address, long[0], max_tokens=MAX_TOKENS)[0] == reference[0]
        # the planner dying changes nothing for serving: the roles stay as it left them
        # (it may have flipped again meanwhile: the generate above is load too)
        planner.kill()
        planner.wait(timeout=30)
        time.sleep(3)  # a SetRole already asked for completes on its worker
        left = [role(w.address) for w in workers]
        time.sleep(5)
        assert [role(w.address) for w in workers] == left
        serving = workers[left.index("decode")]  # min_decode 1: there is one
        assert generate(serving.address, long[1], max_tokens=MAX_TOKENS)[0] == reference[1]
    finally:
        if planner is not None and planner.poll() is None:
            planner.terminate()
        planner_code = planner.wait(timeout=60) if planner is not None else None
        stop_daemons(workers)
        broker.stop()
    assert planner_code == -9, planner_log.read_text()[-3000:]  # killed above
    for w in workers:
        assert w.exit_code() == 0, w.log_tail()
