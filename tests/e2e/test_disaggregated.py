"""Prefill and decode daemons over a real nats-server, NIXL/UCX and gRPC.

Every output must equal the single-process engine's, token for token (greedy, and
seeded sampling).
"""

from __future__ import annotations

import random
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

from splitserve.engine.sampling import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def mixed_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    words = ["time", "river", "light", "stone", "garden", "paper", "signal", "winter", "orbit", "melody"]
    lengths = [6, 12, 20, 30, 60, 90, 130, 200]  # threshold 40: some local, some remote
    return [tokenizer.encode(f"Note {i}: " + " ".join(
        rng.choice(words) for _ in range(lengths[i % len(lengths)]))) for i in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster")
    broker = nats_server(workdir)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url), workdir)
    prefill = start_daemon(worker_config("prefill", "prefill-0", broker.url), workdir)
    daemons = [decode, prefill]
    try:
        wait_ready(daemons)
        yield {"broker": broker, "decode": decode, "prefill": prefill, "workdir": workdir}
    finally:
        stop_daemons(daemons)
        broker.stop()


def test_disaggregated_equals_single_process(cluster, smollm, smollm_engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = mixed_prompts(smollm.tokenizer, 16)
    expected = smollm_engine().generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    address = cluster["decode"].address
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: generate(address, p), prompts))
    got = [tokens for tokens, _ in results]
    assert got == expected
    prefills = [last.timing.prefill for _, last in results]
    assert "remote" in prefills and "local" in prefills
    status = admin_status(address)
    counters = status.get("counters", {})
    assert int(counters.get("num_remote_prefills", 0)) >= 1, status
    assert int(counters.get("num_local_prefills", 0)) >= 1, status


def test_seeded_sampling_equals_single_process(cluster, smollm, smollm_engine) -> None:
    prompts = mixed_prompts(smollm.tokenizer, 8, seed=1)[6:]  # 130 and 200 words: remote
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 1234}
    expected = smollm_engine().generate(prompts, SamplingParams(max_tokens=16, **sampled))
    results = [generate(cluster["decode"].address, p, **sampled) for p in prompts]
    assert [tokens for tokens, _ in results] == expected
    assert [last.timing.prefill for _, last in results] == ["remote", "remote"]


def test_a_remote_prefill_serves_later_prompts_once_its_fence_ends(
        cluster, smollm, smollm_engine) -> None:
    """The accepted attempt's landing pages enter the prefix cache when their lease
    (plus the skew margin) is over: the next turn of a conversation whose history was
    prefilled remotely computes only its new tokens, with the same output."""
    history = mixed_prompts(smollm.tokenizer, 8, seed=2)[7]  # 200 words: remote
    turn = history + smollm.tokenizer.encode(" And then what happened?")
    expected = smollm_engine().generate([turn], SamplingParams(max_tokens=16, temperature=0))
    address = cluster["decode"].address
    _, first = generate(address, history)
    assert first.timing.prefill == "remote"
    deadline = time.monotonic() + 120
    while admin_status(address).get("num_pages_quarantined", 0):
        assert time.monotonic() < deadline, "landing pages still fenced"
        time.sleep(0.5)
    tokens, last = generate(address, turn)
    assert [tokens] == expected
    assert last.timing.num_cached_tokens >= len(history) // 16 * 16 - 16
    assert last.timing.prefill == "local"  # only the new tokens were left: below threshold
