"""The router when decode workers go away and come back (real daemons, real signals):
a draining worker's requests go to the other one and none is lost; with no worker
left the router answers 503 with Retry-After and keeps running; a worker restarted
under the same id gets traffic again; a worker that cannot take a prompt
(RESOURCE_EXHAUSTED) passes it to the other; a frozen worker (SIGSTOP: alive to TCP, silent
to gRPC) is found out by keepalive pings and its requests go to the other one.
Counted, not read from logs."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from cluster import (
    Router,
    admin_status,
    generate,
    nats_server,
    router_health,
    start_daemon,
    start_router,
    stop_daemons,
    stop_router,
    wait_no_leaks,
    wait_ready,
    wait_router,
    worker_config,
)
from openai.types import Completion

from splitserve.config.schema import EngineConfig
from splitserve.model.loader import default_model_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = default_model_path().stem


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def completer(router: Router, timeout_s: float) -> Callable[[int], Completion]:
    """Request i: a greedy 12-token completion through the router (EOS ignored)."""
    client = openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0,
                           timeout=timeout_s)

    def complete(i: int) -> Completion:
        return client.completions.create(model=MODEL, prompt=f"Request {i}: the river",
                                         max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    return complete


def test_workers_leaving_and_returning(tmp_path) -> None:
    broker = nats_server(tmp_path)
    configs = [worker_config("decode", f"decode-{i}", broker.url, drain_grace_s=20.0)
               for i in range(2)]
    daemons = [start_daemon(c, tmp_path) for c in configs]
    router = start_router(broker.url, tmp_path)
    try:
        wait_ready(daemons)
        wait_router(router, num_workers=2)
        request = completer(router, timeout_s=120)

        def complete(i: int) -> int:
            usage = request(i).usage
            assert usage is not None
            return usage.completion_tokens

        # 1. decode-1 drains while requests keep coming: every one completes
        with ThreadPoolExecutor(4) as pool:
            first = [pool.submit(complete, i) for i in range(8)]
            time.sleep(0.5)
            daemons[1].signal(signal.SIGTERM)
            later = [pool.submit(complete, i) for i in range(8, 24)]
            tokens = [f.result() for f in first + later]
        assert tokens == [12] * 24  # none lost, none cut short
        assert daemons[1].exit_code() == 0
        wait_for(lambda: router_health(router).get("num_workers_serving") == 1)

        # 2. the last worker dies: 503 + Retry-After, the router stays up
        daemons[0].process.kill()
        daemons[0].process.wait()
        wait_for(lambda: router_health(router).get("num_workers_serving") == 0)
        with pytest.raises(openai.APIStatusError) as err:
            complete(99)
        assert err.value.status_code == 503
        assert err.value.response.headers["retry-after"] == "1"
        assert router.process.poll() is None

        # 3. decode-0 comes back under the same id: served again
        daemons[0] = start_daemon(configs[0], tmp_path)
        wait_ready([daemons[0]])
        wait_router(router, num_workers=1)
        assert complete(100) == 12
    finally:
        assert stop_router(router) == 0
        stop_daemons(daemons)
        broker.stop()


@pytest.mark.parametrize("keepalive_s", [1.0, 0.0], ids=["pings", "registry_ttl"])
def test_a_frozen_worker_is_found_out_and_its_requests_go_to_the_other(tmp_path,
                                                                       keepalive_s) -> None:
    """Found out by unanswered pings (1 + 2 s) or, with pings off, by its registry entry
    expiring: either way the calls waiting on it are retried on the other worker."""
    broker = nats_server(tmp_path)
    daemons = [start_daemon(worker_config("decode", f"decode-{i}", broker.url), tmp_path)
               for i in range(2)]
    router = start_router(broker.url, tmp_path, keepalive_s=keepalive_s,
                          keepalive_timeout_s=2.0)
    frozen = daemons[1]
    try:
        wait_ready(daemons)
        wait_router(router, num_workers=2)
        request = completer(router, timeout_s=60)

        def complete(i: int) -> str:
            return request(i).choices[0].text

        prompts = range(12)
        with ThreadPoolExecutor(4) as pool:
            reference = list(pool.map(complete, prompts))  # both workers serving
        served = [int(admin_status(d.address)["counters"].get("num_requests_finished", 0))
                  for d in daemons]
        assert min(served) > 0  # each worker had a share

        frozen.signal(signal.SIGSTOP)  # its sockets stay open; nothing answers
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, i) for i in prompts]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except openai.APIError as exc:
                    outcomes.append(f"lost: {exc!r}")
        lost = sum(o.startswith("lost") for o in outcomes)
        wrong = sum(o != r for o, r in zip(outcomes, reference, strict=True)) - lost
        assert (lost, wrong) == (0, 0), outcomes
        # a request caught on the frozen worker waits for it to be found out, not for
        # its 60 s timeout
        assert time.monotonic() - started < (10.0 if keepalive_s else 40.0)
        assert router_health(router).get("num_workers_serving") == 1

        frozen.signal(signal.SIGCONT)  # back: served again, and what it held is freed
        wait_router(router, num_workers=2)
        for daemon in daemons:
            wait_no_leaks(daemon.address)
        assert complete(0) == reference[0]
    finally:
        frozen.signal(signal.SIGCONT)
        assert stop_router(router) == 0
        stop_daemons(daemons)
        broker.stop()


def test_a_prompt_one_worker_cannot_take_goes_to_the_other(tmp_path) -> None:
    """decode-1's KV pool (4 pages: 64 tokens) can never hold a 100-token prompt: it
    answers RESOURCE_EXHAUSTED before any token, and the router tries decode-0."""
    broker = nats_server(tmp_path)
    daemons = [start_daemon(worker_config("decode", "decode-0", broker.url), tmp_path),
               start_daemon(worker_config("decode", "decode-1", broker.url,
                                          engine=EngineConfig(num_pages=4, max_num_seqs=4)),
                            tmp_path)]
    router = start_router(broker.url, tmp_path)
    try:
        wait_ready(daemons)
        wait_router(router, num_workers=2)
        prompts = [[1000 + 97 * i + j for j in range(100)] for i in range(4)]
        # decode-1 holds no page and runs nothing: never costlier than decode-0, so it
        # is the first choice at least once
        with ThreadPoolExecutor(4) as pool:  # all at once, while decode-1 refuses
            through = list(pool.map(lambda p: generate(router.address, p, max_tokens=8)[0],
                                    prompts))
        refused = int(admin_status(daemons[1].address)["counters"].get("num_rejects", 0))
        assert refused >= 1  # the fault struck
        assert through == [generate(daemons[0].address, p, max_tokens=8)[0] for p in prompts]
        assert all(len(t) == 8 for t in through)
        for daemon in daemons:
            wait_no_leaks(daemon.address)
    finally:
        assert stop_router(router) == 0
        stop_daemons(daemons)
        broker.stop()
