"""Admin.SetRole on worker daemons (subprocesses, a real nats-server, NIXL/UCX, gRPC).

decode-0 stays a decode worker; flex-1 starts as one and is switched to prefill while
requests run on both (with the CLI), serves decode-0's long prompts as a prefill worker,
and is switched back while those run (with grpcurl). Every request finishes exactly
once, with the single-process engine's greedy tokens; no page leaks on either worker.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cluster import (
    GRPCURL,
    SPLITSERVE,
    Daemon,
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORDS = ["time", "river", "light", "stone", "garden", "paper", "signal", "winter", "orbit"]
MAX_TOKENS = 12


def prompts(tokenizer, lengths: list[int], seed: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    return [tokenizer.encode(f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range(n)))
            for i, n in enumerate(lengths)]


def counter(status: dict, name: str) -> int:
    return int(status.get("counters", {}).get(name, 0))


def num_finished(*daemons: Daemon) -> int:
    return sum(counter(admin_status(d.address), "num_requests_finished") for d in daemons)


class Client:
    """Sends each prompt to a worker; UNAVAILABLE (draining, or no longer a decode
    worker) is retried on `fallback`, as a router does. Records how often."""

    def __init__(self, fallback: Daemon) -> None:
        self.fallback = fallback
        self.num_unavailable = 0

    def __call__(self, target: Daemon, prompt: list[int]) -> tuple[list[int], object]:
        try:
            return generate(target.address, prompt, max_tokens=MAX_TOKENS)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                raise
            self.num_unavailable += 1
            return generate(self.fallback.address, prompt, max_tokens=MAX_TOKENS)


def run_during(work: Callable[[], list], action: Callable[[], None],  # type: ignore[type-arg]
               started: Callable[[], bool]) -> list:  # type: ignore[type-arg]
    """`work()` on a thread; `action()` once `started()` says it is under way."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(work)
        deadline = time.monotonic() + 60
        while not started() and not future.done():
            assert time.monotonic() < deadline, "the requests never started"
            time.sleep(0.05)
        action()
        return future.result()


def set_role_cli(target: Daemon, role: str) -> str:
    out = subprocess.run([*SPLITSERVE, "admin", "set-role", "--target", target.address,
                          "--role", role, "--grace-s", "60"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def set_role_grpcurl(target: Daemon, role: str) -> dict:
    out = subprocess.run([GRPCURL, "-plaintext", "-max-time", "120", "-d",
                          json.dumps({"role": role, "grace_s": 60}), target.address,
                          "splitserve.v1.Admin/SetRole"],
                         capture_output=True, text=True, timeout=130, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_switch_decode_to_prefill_and_back_under_load(
        tmp_path: Path, smollm, smollm_engine) -> None:  # type: ignore[no-untyped-def]
    short = prompts(smollm.tokenizer, [6, 14, 22, 30] * 3, seed=0)  # local on any worker
    long = prompts(smollm.tokenizer, [120, 160, 200, 140], seed=1)  # remote when it can
    reference = smollm_engine().generate(short + long,
                                         SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    want = {tuple(p): r for p, r in zip(short + long, reference)}
    broker = nats_server(tmp_path)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url), tmp_path)
    flex = start_daemon(worker_config("decode", "flex-1", broker.url), tmp_path)
    daemons = [decode, flex]
    client = Client(fallback=decode)
    try:
        wait_ready(daemons)
        num_sent = 0

        # 1. decode → prefill (CLI) while short requests run on both workers.
        def on_both() -> list:  # type: ignore[type-arg]
            with ThreadPoolExecutor(6) as pool:
                return list(pool.map(lambda i: client((decode, flex)[i % 2], short[i]),
                                     range(len(short))))

        lines: list[str] = []
        results = run_during(on_both, lambda: lines.append(set_role_cli(flex, "prefill")),
                             lambda: admin_status(flex.address).get("num_in_flight", 0) > 0)
        num_sent += len(short)
        assert lines == ["role prefill (was decode): SWITCHED, state SERVING"]
        assert [tokens for tokens, _ in results] == [want[tuple(p)] for p in short]
        status = admin_status(flex.address)
        assert (status["role"], status["state"]) == ("prefill", "SERVING_STATE_SERVING")
        assert counter(status, "num_role_switches") == 1

        # 2. A reload keeps the switched role (the file still says decode).
        out = subprocess.run([*SPLITSERVE, "admin", "reload", "--target", flex.address],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        status = admin_status(flex.address)
        assert status["role"] == "prefill" and not status.get("config_reload_error"), status

        # 3. Long prompts on decode-0 are prefilled by flex-1.
        remote_before = counter(admin_status(decode.address), "num_remote_prefills")
        results = [client(decode, p) for p in long]
        num_sent += len(long)
        assert [tokens for tokens, _ in results] == [want[tuple(p)] for p in long]
        assert [last.timing.prefill for _, last in results] == ["remote"] * len(long)
        assert counter(admin_status(decode.address), "num_remote_prefills") \
            - remote_before == len(long)
        assert counter(admin_status(flex.address), "num_remote_prefills") == len(long)

        # 4. prefill → decode (grpcurl, listed by reflection) while long prompts run.
        listing = subprocess.run([GRPCURL, "-plaintext", flex.address, "list",
                                  "splitserve.v1.Admin"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
        assert "splitserve.v1.Admin.SetRole" in listing

        def long_on_decode() -> list:  # type: ignore[type-arg]
            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(lambda p: client(decode, p), long))

        jobs_before = counter(admin_status(decode.address), "num_remote_attempts")
        switched: list[dict] = []
        results = run_during(
            long_on_decode, lambda: switched.append(set_role_grpcurl(flex, "decode")),
            lambda: counter(admin_status(decode.address), "num_remote_attempts") > jobs_before)
        num_sent += len(long)
        assert switched[0]["role"] == "decode" and switched[0]["previous_role"] == "prefill"
        assert switched[0]["outcome"] == "ROLE_SWITCH_OUTCOME_SWITCHED"
        assert [tokens for tokens, _ in results] == [want[tuple(p)] for p in long]

        # 5. flex-1 serves Generate again; nothing lost, nothing run twice, no leaks.
        results = [client(flex, p) for p in short[:4] + long[:1]]
        num_sent += 5
        assert [tokens for tokens, _ in results] == [want[tuple(p)] for p in short[:4] + long[:1]]
        status = admin_status(flex.address)
        assert (status["role"], counter(status, "num_role_switches")) == ("decode", 2)
        assert num_finished(decode, flex) == num_sent  # each request finished exactly once
        for daemon in daemons:
            wait_no_leaks(daemon.address, timeout_s=120)
    finally:
        stop_daemons(daemons)
        broker.stop()
    for daemon in daemons:
        assert daemon.exit_code() == 0, daemon.log_tail()
    assert "switched decode → prefill" in flex.log_path.read_text()
