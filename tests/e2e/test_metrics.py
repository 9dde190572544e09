"""Prometheus `/metrics` and WorkerStats over real daemons: after a known set of
requests (some prefilled locally, some remotely), each daemon's histograms and
counters count exactly those requests, tokens and transfers, the page gauges are
there, and the WorkerStats on NATS carry measured rates, not zeros."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from cluster import generate, nats_server, start_daemon, stop_daemons, wait_ready, worker_config
from prometheus_client.parser import text_string_to_metric_families
from test_faults import long_prompts

from splitserve.queue.broker import find_free_port
from splitserve.queue.connection import connect
from splitserve.queue.stats import StatsSubscription

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def scrape(address: str) -> dict[str, dict[tuple, float]]:
    """`curl http://address/metrics`, parsed: sample name → {labels: value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


async def next_stats(url: str, role: str, worker_id: str) -> object:
    broker = await connect(url, name="test")
    try:
        sub = await StatsSubscription.subscribe(broker.nc, role, worker_id)
        return await sub.next(timeout_s=10)
    finally:
        await broker.close()


def test_metrics_count_the_requests_sent(tmp_path, smollm) -> None:
    broker = nats_server(tmp_path)
    addresses = {name: f"127.0.0.1:{find_free_port()}" for name in ("decode", "prefill")}
    decode = start_daemon(worker_config("decode", "decode-0", broker.url,
                                        metrics_address=addresses["decode"]), tmp_path)
    prefill = start_daemon(worker_config("prefill", "prefill-0", broker.url,
                                         metrics_address=addresses["prefill"]), tmp_path)
    try:
        wait_ready([decode, prefill])
        idle = scrape(addresses["decode"])
        assert idle["splitserve:time_to_first_token_seconds_count"][()] == 0
        short = [smollm.tokenizer.encode(f"Say {w} twice.") for w in ("one", "two", "three")]
        prompts = short + long_prompts(smollm.tokenizer, 2, words=120)
        paths, outputs = [], 0
        for prompt in prompts:
            tokens, last = generate(decode.address, prompt, max_tokens=6, ignore_eos=True)
            paths.append(last.timing.prefill)
            outputs += len(tokens)
            assert last.timing.queue_ms >= 0 and last.timing.ttft_ms > 0
        assert paths == ["local"] * 3 + ["remote"] * 2

        d, p = scrape(addresses["decode"]), scrape(addresses["prefill"])
        n = len(prompts)
        assert d["splitserve:time_to_first_token_seconds_count"][()] == n
        assert d["splitserve:time_to_first_token_seconds_sum"][()] > 0
        assert d["splitserve:e2e_request_latency_seconds_count"][()] == n
        assert d["splitserve:inter_token_latency_seconds_count"][()] == outputs - n
        assert d["splitserve:inter_token_latency_seconds_sum"][()] > 0
        assert d["splitserve:request_queue_time_seconds_count"][()] == n
        prefill_counts = d["splitserve:request_prefill_time_seconds_count"]
        assert prefill_counts[(("path", "local"),)] == 3
        assert prefill_counts[(("path", "remote"),)] == 2
        assert d["splitserve:request_success_total"][(("finished_reason", "length"),)] == n
        assert d["splitserve:generation_tokens_total"][()] == outputs
        assert d["splitserve:prompt_tokens_total"][()] == sum(len(x) for x in prompts)
        assert d["splitserve:offload_decisions_local_total"][()] == 3
        assert d["splitserve:offload_decisions_remote_total"][()] == 2
        assert d["splitserve:remote_attempts_total"][()] == 2
        assert d["splitserve:remote_fallbacks_total"][()] == 0
        assert d["splitserve:num_requests_running"][()] == 0
        pages = d["splitserve:kv_pages"]
        assert pages[(("state", "used"),)] == 0
        # the remote prompts' landing pages stay fenced until their leases are over
        assert pages[(("state", "quarantined"),)] > 0
        deadline = time.monotonic() + 60
        while scrape(addresses["decode"])["splitserve:kv_pages"][(("state", "quarantined"),)]:
            assert time.monotonic() < deadline, "quarantined pages never released"
            time.sleep(0.5)
        assert p["splitserve:kv_transfers_total"][()] == 2
        assert p["splitserve:kv_transfer_seconds_count"][()] == 2
        assert p["splitserve:kv_transfer_bytes_sum"][()] > 0
        assert p["splitserve:request_prefill_time_seconds_count"][(("path", "job"),)] == 2
        assert p["splitserve:remote_prefills_total"][()] == 2

        stats = asyncio.run(next_stats(broker.url, "decode", "decode-0"))
        assert stats.tokens_per_s > 0 and stats.ttft_p50_ms > 0 and stats.itl_p50_ms > 0
        assert stats.window_s == 60
        assert stats.prefill_rates and all(r.tokens_per_s > 0 for r in stats.prefill_rates)
        assert stats.decode_steps and stats.decode_steps[0].mean_ms > 0
        pstats = asyncio.run(next_stats(broker.url, "prefill", "prefill-0"))
        assert pstats.transfer_bytes_per_s > 0
        assert sum(r.num_samples for r in pstats.prefill_rates) == 2
    finally:
        stop_daemons([decode, prefill])
        broker.stop()
