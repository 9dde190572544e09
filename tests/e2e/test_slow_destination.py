"""One slow destination does not stall a prefill worker's other jobs.

Decode worker B is frozen (SIGSTOP) right after its long prompt's job was queued, so
the prefill worker's write to B cannot complete (UCX needs B's progress) and waits
for `transfer_timeout_s`. Meanwhile decode worker A's long prompts go remote through
the same prefill worker and complete at their usual speed, each far below the
timeout. Then B resumes and its request completes (a retry or a local fallback) with
the single-process engine's tokens, and no page leaks on either decode worker.
Counters come from Admin/GetStatus (grpcurl), never from log text."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster import admin_status as status
from cluster import generate, nats_server, start_daemon, stop_daemons, wait_ready, worker_config
from test_faults import expected_outputs, long_prompts, wait_no_leaks

from splitserve.config.daemon import LeaseConfig, PrefillRoleConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
# A lease long enough that B's job is still valid while its transfer hangs.
LEASE = LeaseConfig(base_s=30.0, per_token_ms=0.0, skew_margin_s=0.3)
TRANSFER_TIMEOUT_S = 12.0  # below the registry's 15 s TTL: B stays registered meanwhile


def _wait(predicate, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _counter(address: str, name: str) -> int:
    return int(status(address)["counters"].get(name, 0))


def test_slow_destination_does_not_stall_other_jobs(tmp_path, smollm, smollm_engine) -> None:
    broker = nats_server(tmp_path)
    prefill_cfg = PrefillRoleConfig(transfer_timeout_s=TRANSFER_TIMEOUT_S)
    a, b, p = (start_daemon(worker_config(role, wid, broker.url, lease=LEASE,
                                          prefill=prefill_cfg), tmp_path)
               for role, wid in (("decode", "decode-a"), ("decode", "decode-b"),
                                 ("prefill", "prefill-0")))
    try:
        wait_ready([a, b, p])
        prompts = long_prompts(smollm.tokenizer, 4)
        expected = expected_outputs(smollm_engine, prompts)
        with ThreadPoolExecutor(1) as pool:
            p.signal(signal.SIGSTOP)  # holds B's job in the queue
            slow = pool.submit(generate, b.address, prompts[0], 8)
            _wait(lambda: int(status(b.address).get("num_in_flight", 0)) >= 1,
                  "B's remote attempt")
            time.sleep(1.0)  # the job is published once the attempt is in flight
            b.signal(signal.SIGSTOP)
            p.signal(signal.SIGCONT)
            _wait(lambda: int(status(p.address).get("num_in_flight", 0)) >= 1,
                  "the prefill worker to take B's job")
            stalled_since = time.monotonic()
            for prompt, want in zip(prompts[1:], expected[1:], strict=True):
                started = time.monotonic()
                tokens, last = generate(a.address, prompt, 8)
                took_s = time.monotonic() - started
                assert tokens == want
                assert last.timing.num_attempts == 1  # remote, first try
                assert took_s < TRANSFER_TIMEOUT_S / 3, took_s
            # B's write was still hanging all along: only A's jobs have been written.
            assert time.monotonic() - stalled_since < TRANSFER_TIMEOUT_S
            assert _counter(p.address, "num_remote_prefills") == 3
            assert int(status(p.address).get("num_in_flight", 0)) == 1
            b.signal(signal.SIGCONT)
            tokens, _ = slow.result(timeout=120)
        assert tokens == expected[0]
        assert _counter(a.address, "num_fallbacks") == 0
        for d in (a, b):
            wait_no_leaks(d.address, timeout_s=LEASE.base_s + 10)
    finally:
        stop_daemons([a, b, p])
        broker.stop()
