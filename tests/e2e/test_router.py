"""The router in front of a real cluster (nats-server, decode-0, decode-1, prefill-0,
`splitserve router`), driven by the real `openai` client, `curl` and gRPC: greedy
outputs through it equal the single-process engine's, requests spread over both decode
workers, and every bad input gets an OpenAI-shaped error while the router keeps serving
and no page stays in use."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from cluster import (
    Router,
    admin_status,
    generate,
    nats_server,
    router_health,
    router_metrics,
    start_daemon,
    start_router,
    stop_daemons,
    stop_router,
    wait_no_leaks,
    wait_ready,
    wait_router,
    worker_config,
)

from splitserve.config.router import PerClass, QosConfig
from splitserve.engine.sampling import SamplingParams
from splitserve.model.loader import default_model_path
from splitserve.queue.connection import connect
from splitserve.queue.policy import PolicyStore
from splitserve.queue.settings import BucketSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = default_model_path().stem
PROMPTS = ["The capital of France is", "Once upon a time, in a quiet garden,",
           "List three colours: red,", "def fibonacci(n):",
           "Water boils at a temperature of " + "very " * 40 + "high degrees",
           "The river", "In 1969, the first humans", "Stone, paper and"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("router")
    broker = nats_server(workdir)
    daemons = [start_daemon(worker_config(role, worker_id, broker.url), workdir)
               for role, worker_id in (("decode", "decode-0"), ("decode", "decode-1"),
                                       ("prefill", "prefill-0"))]
    router = start_router(broker.url, workdir)
    try:
        wait_ready(daemons)
        wait_router(router, num_workers=2)
        yield {"router": router, "decode": daemons[:2], "broker": broker}
    finally:
        assert stop_router(router) == 0, router.log_tail()
        stop_daemons(daemons)
        broker.stop()


@pytest.fixture(scope="module")
def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster["router"].base_url, api_key="none", max_retries=0,
                         timeout=120)


def reference(smollm, smollm_engine, token_lists: list[list[int]], max_tokens: int) -> list[str]:
    outputs = smollm_engine().generate(token_lists, SamplingParams(max_tokens=max_tokens,
                                                                   temperature=0))
    return [smollm.tokenizer.decode(tokens) for tokens in outputs]


def test_completions_equal_single_process_and_spread(cluster, client, smollm,
                                                     smollm_engine) -> None:
    before = [int(admin_status(d.address)["counters"].get("num_requests_finished", 0))
              for d in cluster["decode"]]
    expected = reference(smollm, smollm_engine, [smollm.tokenizer.encode(p) for p in PROMPTS],
                         12)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: client.completions.create(
            model=MODEL, prompt=p, max_tokens=12, temperature=0), PROMPTS))
    assert [a.choices[0].text for a in answers] == expected
    assert all(a.usage.completion_tokens == 12 or a.choices[0].finish_reason == "stop"
               for a in answers)
    assert [a.usage.prompt_tokens for a in answers] == [
        len(smollm.tokenizer.encode(p)) for p in PROMPTS]
    after = [int(admin_status(d.address)["counters"].get("num_requests_finished", 0))
             for d in cluster["decode"]]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == len(PROMPTS) and min(served) >= 1, served


def test_chat_streaming_equals_non_streaming_and_reference(cluster, client, smollm,
                                                           smollm_engine) -> None:
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm.tokenizer.encode(smollm.tokenizer.apply_chat_template(messages))
    [expected] = reference(smollm, smollm_engine, [prompt], 16)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == (
        whole.usage.total_tokens)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_curl_streams_server_sent_events(cluster) -> None:
    body = json.dumps({"model": MODEL, "prompt": "The river", "max_tokens": 5,
                       "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", f"{cluster['router'].base_url}/completions",
                          "-H", "content-type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=120, check=True)
    events = [line.removeprefix("data: ") for line in out.stdout.splitlines() if line]
    assert events[-1] == "[DONE]", out.stdout
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "text_completion" for c in chunks)


def test_models_health_and_metrics(cluster, client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert router_health(cluster["router"]) == {"status": "ok", "num_workers_serving": 2}
    before = router_metrics(cluster["router"])
    client.completions.create(model=MODEL, prompt="The river", max_tokens=2, temperature=0)
    after = router_metrics(cluster["router"])
    assert after['splitserve:router_requests_total{outcome="requests"}'] == (
        before['splitserve:router_requests_total{outcome="requests"}'] + 1)
    ttft_count = f'splitserve:router_time_to_first_token_seconds_count{{model_name="{MODEL}"}}'
    assert after[ttft_count] == before.get(ttft_count, 0) + 1
    met = 'splitserve:router_slo_requests_total{outcome="met",priority="normal"}'
    assert after[met] == before[met] + 1  # 2 tokens, well within 8 s and 0.2 s a token
    assert after["splitserve:router_workers_serving"] == 2
    # the admission estimate of each worker: a line once it answered, and per class the
    # tokens in flight (none now) and the calibration factor
    workers = {k.split('worker="')[1].split('"')[0] for k in after
               if k.startswith("splitserve:router_pending_prompt_tokens")}
    assert len(workers) == 2
    slopes = {k: v for k, v in after.items()
              if k.startswith("splitserve:router_ttft_seconds_per_token")}
    assert slopes and all(v > 0 for v in slopes.values())
    for worker in workers:
        for priority in ("high", "normal", "low"):
            labels = f'{{priority="{priority}",worker="{worker}"}}'
            assert after[f"splitserve:router_pending_prompt_tokens{labels}"] == 0
            assert 0.5 <= after[f"splitserve:router_ttft_calibration{labels}"] <= 4.0


def test_grpc_through_the_router_equals_direct(cluster, smollm) -> None:
    prompt = smollm.tokenizer.encode("Stone, paper and")
    direct, _ = generate(cluster["decode"][0].address, prompt, max_tokens=10)
    before = router_metrics(cluster["router"])
    routed, last = generate(cluster["router"].config.grpc_address, prompt, max_tokens=10)
    assert routed == direct and last.timing.num_output_tokens == 10
    after = router_metrics(cluster["router"])  # gRPC calls are timed and judged as HTTP's
    for name in (f'splitserve:router_time_to_first_token_seconds_count{{model_name="{MODEL}"}}',
                 'splitserve:router_slo_requests_total{outcome="met",priority="normal"}'):
        assert after[name] == before.get(name, 0) + 1
    with pytest.raises(grpc.RpcError) as err:
        generate(cluster["router"].config.grpc_address, prompt, max_tokens=0)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # the worker's, relayed


BAD_INPUT = [  # (body, status, error type, param)
    (b"{not json", 400, "invalid_request_error", None),
    (b'{"model": "x", "prompt": "\xff\xfe"}', 400, "invalid_request_error", None),
    (b"[1, 2]", 400, "invalid_request_error", ""),
    (json.dumps({"prompt": "Hi"}).encode(), 400, "invalid_request_error", "model"),
    (json.dumps({"model": "gpt-4", "prompt": "Hi"}).encode(), 404, "not_found_error", "model"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": -1}).encode(), 400,
     "invalid_request_error", "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": "8"}).encode(), 400,
     "invalid_request_error", "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 10**9}).encode(), 400,
     "invalid_request_error", "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "n": 2}).encode(), 400,
     "invalid_request_error", "n"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "temperature": 3}).encode(), 400,
     "invalid_request_error", "temperature"),
    (json.dumps({"model": MODEL, "prompt": ""}).encode(), 400, "invalid_request_error",
     "prompt"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "logprobs": 2}).encode(), 400,
     "invalid_request_error", "logprobs"),
    (json.dumps({"model": MODEL, "prompt": [1, -5]}).encode(), 400, "invalid_request_error",
     "prompt"),
    (json.dumps({"model": MODEL, "prompt": "\ud800"}).encode(), 400,
     "invalid_request_error", "prompt"),
    (json.dumps({"model": MODEL, "prompt": "Hi", "priority": "urgent"}).encode(), 400,
     "invalid_request_error", "priority"),
]


def post(base_url: str, path: str, body: bytes) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", f"{base_url}{path}",
                          "-H", "content-type: application/json", "--data-binary", "@-"],
                         input=body, capture_output=True, timeout=60, check=True)
    text, _, code = out.stdout.decode().rpartition("\n")
    return int(code), json.loads(text)


@pytest.mark.parametrize(("body", "status", "kind", "param"), BAD_INPUT)
def test_bad_input_gets_an_openai_error(cluster, body, status, kind, param) -> None:
    code, reply = post(cluster["router"].base_url, "/completions", body)
    assert code == status, reply
    assert set(reply) == {"error"} and reply["error"]["type"] == kind, reply
    if param is not None:
        assert reply["error"]["param"] == param, reply
    assert reply["error"]["message"]


def test_oversized_body_is_refused_before_parsing(cluster) -> None:
    body = b'{"model": "' + b"x" * (9 << 20) + b'"}'
    code, reply = post(cluster["router"].base_url, "/completions", body)
    assert code == 413 and "over" in reply["error"]["message"], reply


def test_a_client_leaving_mid_stream_frees_everything(cluster, client) -> None:
    with client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=1500,
                                   temperature=0, stream=True, extra_body={
                                       "ignore_eos": True}) as stream:
        for i, _ in enumerate(stream):
            if i == 3:
                break  # closes the connection
    for decode in cluster["decode"]:
        wait_no_leaks(decode.address)
    # and the router still serves
    answer = client.completions.create(model=MODEL, prompt="The river", max_tokens=3,
                                       temperature=0)
    assert answer.usage.completion_tokens == 3
    assert router_health(cluster["router"])["num_workers_serving"] == 2


def test_a_prompt_goes_where_its_prefix_is_cached(cluster, client, smollm) -> None:
    """Each prompt is first sent straight to one worker (the router does not see it); its
    cache's events then steer the router's request for the same prompt to that worker.
    38 tokens: below the workers' remote threshold (40), as landing pages of a remote
    prefill never enter the prefix cache."""
    decode = cluster["decode"]
    prompts = [[1000 + i, *range(2000, 2037)] for i in range(4)]
    for i, prompt in enumerate(prompts):
        generate(decode[i % 2].address, prompt, max_tokens=1)
    time.sleep(1.0)  # the events go out every 50 ms
    for prompt in prompts:
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                           temperature=0)
        cached = answer.usage.prompt_tokens_details.cached_tokens
        assert cached == 32, (len(prompt), cached)  # 2 full pages of 16


@contextlib.contextmanager
def measured_router(cluster, tmp_path, qos: QosConfig, prompt: list[int]
                    ) -> Iterator[tuple[Router, openai.OpenAI]]:
    """A second router on the cluster with `qos`, after two requests of `prompt` (so it
    has measured both workers); stopped cleanly at the end."""
    router = start_router(cluster["broker"].url, tmp_path, qos=qos)
    try:
        wait_router(router, num_workers=2)
        client = openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0,
                               timeout=120)
        for _ in range(2):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                      temperature=0)
        yield router, client
    finally:
        assert stop_router(router) == 0


def test_admission_refuses_low_priority_early_and_admits_high(cluster, tmp_path,
                                                              smollm) -> None:
    """A second router whose low class accepts no wait: once it has measured the workers,
    a low request is refused with 429 and Retry-After before any worker sees it; high and
    normal ones are served, normal ones with max_tokens capped (graceful degradation)."""
    strict = QosConfig(reject_above_s=PerClass(normal=60.0, low=0.001),
                       degrade_above_s=PerClass(normal=0.001), degraded_max_tokens=3,
                       ttft_slo_s=PerClass(high=60, normal=60, low=60),
                       tpot_slo_s=PerClass(high=1e-6))  # no high request meets it
    prompt = smollm.tokenizer.encode("Priorities: " + "first things first " * 8)
    with measured_router(cluster, tmp_path, strict, prompt) as (router, client):
        before = [int(admin_status(d.address)["counters"].get("num_requests_finished", 0))
                  for d in cluster["decode"]]
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                      temperature=0, extra_headers={"x-priority": "low"})
        assert refused.value.response.headers["retry-after"] == "1"
        assert "priority low" in refused.value.message
        high = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                         temperature=0, extra_body={"priority": "high",
                                                                    "ignore_eos": True})
        assert high.usage.completion_tokens == 5
        normal = client.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
            extra_body={"ignore_eos": True})
        assert normal.headers["x-splitserve-degraded"] == "max_tokens=3"
        answer = normal.parse()
        assert answer.usage.completion_tokens == 3
        assert answer.choices[0].finish_reason == "length"
        after = [int(admin_status(d.address)["counters"].get("num_requests_finished", 0))
                 for d in cluster["decode"]]
        assert sum(after) - sum(before) == 2  # the refused one never reached a worker
        judged = {k.split("{")[1]: v for k, v in router_metrics(router).items()
                  if k.startswith("splitserve:router_slo_requests_total") and v}
        assert judged == {'outcome="tpot_missed",priority="high"}': 1,  # 5 tokens
                          'outcome="met",priority="normal"}': 3}  # 2 measuring + 1; low: 0


def test_a_long_prompt_on_idle_workers_is_served_not_refused(cluster, tmp_path,
                                                            smollm) -> None:
    """Admission judges the load, not a prompt's length: a router whose normal class
    accepts 1 s, having measured ~12-token prompts only, serves a ~1,500-token one on
    idle workers (its estimate from those samples is several seconds; the router
    answered 429 "retry later" to it at every retry)."""
    short = smollm.tokenizer.encode("Short: " + "one two " * 4)
    long = smollm.tokenizer.encode("Long and new: " + "alpha beta gamma delta " * 375)
    assert len(long) > 100 * len(short) > 1000
    with measured_router(cluster, tmp_path, QosConfig(reject_above_s=PerClass(normal=1.0)),
                         short) as (_, client):
        answer = client.completions.create(model=MODEL, prompt=long, max_tokens=1,
                                           temperature=0)
        assert answer.usage.prompt_tokens == len(long)
        assert answer.usage.prompt_tokens_details.cached_tokens == 0


async def _put_router_policy(url: str, value: bytes | None) -> None:
    conn = await connect(url, name="test-admin", connect_timeout_s=10)
    try:
        store = await PolicyStore.open(conn.js, BucketSettings())
        if value is None:
            await store.delete("router")
        else:
            await store.put("router", value)
    finally:
        await conn.close()


def test_the_policy_bucket_retunes_the_router_live(cluster, client, smollm) -> None:
    """The `router` key of splitserve-policy makes the running router refuse low priority
    at once (it has measured the workers by now); deleting it restores the file's QoS."""
    url, prompt = cluster["broker"].url, smollm.tokenizer.encode("Live policy " * 10)

    def low() -> int:
        try:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                      temperature=0, extra_body={"priority": "low"})
        except openai.RateLimitError:
            return 429
        return 200

    assert low() == 200
    asyncio.run(_put_router_policy(url, b'{"qos": {"reject_above_s": {"low": 0.0001}}}'))
    deadline = time.monotonic() + 10
    while low() == 200:
        assert time.monotonic() < deadline, "the router never applied the policy"
        time.sleep(0.2)
    asyncio.run(_put_router_policy(url, None))
    deadline = time.monotonic() + 10
    while low() == 429:
        assert time.monotonic() < deadline, "the router never restored the file's policy"
        time.sleep(0.2)


def test_hedging_races_a_late_high_request_on_an_idle_worker(cluster, tmp_path,
                                                             smollm) -> None:
    """A router whose high class is promised an impossible TTFT races every high request
    on both (idle) workers: the answer is the single-process one, the loser's pages are
    freed, and the race is counted."""
    hedging = QosConfig(hedge=True, ttft_slo_s=PerClass(high=0.0001, normal=60, low=60))
    prompt = smollm.tokenizer.encode("Hedge your bets: " + "twice is nice " * 6)
    with measured_router(cluster, tmp_path, hedging, prompt) as (router, client):
        before = router_metrics(router)
        direct, _ = generate(cluster["decode"][0].address, prompt, max_tokens=8)
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           temperature=0, extra_body={"priority": "high"})
        assert answer.choices[0].text == smollm.tokenizer.decode(direct)
        after = router_metrics(router)
        hedged = 'splitserve:router_requests_total{outcome="hedged"}'
        assert after[hedged] == before[hedged] + 1
        for decode in cluster["decode"]:
            wait_no_leaks(decode.address)
