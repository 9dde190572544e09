"""Leases that fit the work, over real daemons: a prefill worker whose job would
outrun its lease gets it renewed by the decode worker and finishes in one attempt;
one that cannot finish even at the lease cap declines the job up front and the
decode worker prefills locally at once, without waiting out the lease. Outputs are
compared with the single-process engine; counters come from Admin/GetStatus
(grpcurl) and /metrics, never from log text."""

from __future__ import annotations

import contextlib
import time

import pytest
from cluster import (
    admin_status,
    generate,
    nats_server,
    start_daemon,
    stop_daemons,
    wait_ready,
    worker_config,
)
from test_faults import expected_outputs, long_prompts, wait_no_leaks
from test_metrics import scrape

from splitserve.config.daemon import LeaseConfig
from splitserve.queue.broker import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@contextlib.contextmanager
def _cluster(tmp_path, decode_lease: LeaseConfig, prefill_lease: LeaseConfig):
    """(decode daemon, metrics addresses by role) over a fresh broker."""
    broker = nats_server(tmp_path)
    metrics = {role: f"127.0.0.1:{find_free_port()}" for role in ("decode", "prefill")}
    daemons = [start_daemon(worker_config(role, f"{role}-0", broker.url, lease=lease,
                                          metrics_address=metrics[role]), tmp_path)
               for role, lease in (("decode", decode_lease), ("prefill", prefill_lease))]
    try:
        wait_ready(daemons)
        yield daemons[0], metrics
    finally:
        stop_daemons(daemons)
        broker.stop()


def test_a_job_that_would_outrun_its_lease_is_renewed_not_thrown_away(
        tmp_path, smollm, smollm_engine) -> None:
    # The decode worker sizes a 0.6 s lease for a ~300-token prompt (nothing measured
    # yet); the prefill worker estimates 3 s (50 ms per token): it must renew at once.
    short = LeaseConfig(base_s=0.6, per_token_ms=0.0, skew_margin_s=0.1, max_s=60.0)
    slow = LeaseConfig(base_s=0.6, per_token_ms=10.0, skew_margin_s=0.1, max_s=60.0)
    with _cluster(tmp_path, short, slow) as (decode, metrics):
        prompts = long_prompts(smollm.tokenizer, 2, words=260)
        expected = expected_outputs(smollm_engine, prompts)
        for prompt, want in zip(prompts, expected, strict=True):
            tokens, last = generate(decode.address, prompt, 8)
            assert tokens == want
            assert (last.timing.prefill, last.timing.num_attempts) == ("remote", 1)
        d, p = scrape(metrics["decode"]), scrape(metrics["prefill"])
        # the first job is renewed; later ones may fit a lease sized from the measured rate
        assert d["splitserve:lease_renewals_total"][()] >= 1
        # the prefill worker counts the grants it received: one whose reply came after its
        # request timed out (seen under CPU load in CI) is given but never used, which is
        # safe (the old deadline stands); a grant is never counted that was not given
        assert 1 <= p["splitserve:lease_renewals_total"][()] <= (
            d["splitserve:lease_renewals_total"][()])
        assert d["splitserve:lease_expiries_total"][()] == 0
        assert d["splitserve:remote_fallbacks_total"][()] == 0
        assert p["splitserve:expired_jobs_total"][()] == 0
        counters = admin_status(decode.address)["counters"]  # grpcurl Admin/GetStatus
        assert int(counters["num_lease_renewals"]) == d["splitserve:lease_renewals_total"][()]
        assert int(counters["num_remote_attempts"]) == 2
        wait_no_leaks(decode.address, timeout_s=30)


def test_a_job_beyond_the_lease_cap_is_declined_and_goes_local_at_once(
        tmp_path, smollm, smollm_engine) -> None:
    # Cap 3 s; the prefill worker estimates ~15 s (50 ms per token): it declines.
    capped = LeaseConfig(base_s=2.5, per_token_ms=0.0, skew_margin_s=0.1, max_s=3.0)
    slow = LeaseConfig(base_s=2.5, per_token_ms=50.0, skew_margin_s=0.1, max_s=3.0)
    with _cluster(tmp_path, capped, slow) as (decode, metrics):
        prompts = long_prompts(smollm.tokenizer, 1, words=260)
        expected = expected_outputs(smollm_engine, prompts)
        started = time.monotonic()
        tokens, last = generate(decode.address, prompts[0], 8)
        assert tokens == expected[0]
        assert last.timing.prefill == "local"
        d, p = scrape(metrics["decode"]), scrape(metrics["prefill"])
        assert p["splitserve:declined_jobs_total"][()] >= 1
        assert d["splitserve:declined_jobs_total"][()] == p["splitserve:declined_jobs_total"][()]
        assert d["splitserve:lease_expiries_total"][()] == 0  # never waited out a lease
        assert p["splitserve:request_prefill_time_seconds_count"][(("path", "job"),)] == 0
        assert time.monotonic() - started < 20
        wait_no_leaks(decode.address, timeout_s=30)
