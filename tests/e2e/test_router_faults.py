"""The router when decode workers go away and come back (real daemons, real signals):
a draining worker's requests go to the other one and none is lost; with no worker
left the router answers 503 with Retry-After and keeps running; a worker restarted
under the same id gets traffic again. Counted, not read from logs."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from cluster import (
    nats_server,
    router_health,
    start_daemon,
    start_router,
    stop_daemons,
    stop_router,
    wait_ready,
    wait_router,
    worker_config,
)

from splitserve.model.loader import default_model_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = default_model_path().stem


def wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_workers_leaving_and_returning(tmp_path) -> None:
    broker = nats_server(tmp_path)
    configs = [worker_config("decode", f"decode-{i}", broker.url, drain_grace_s=20.0)
               for i in range(2)]
    daemons = [start_daemon(c, tmp_path) for c in configs]
    router = start_router(broker.url, tmp_path)
    try:
        wait_ready(daemons)
        wait_router(router, num_workers=2)
        client = openai.OpenAI(base_url=router.base_url, api_key="none", max_retries=0,
                               timeout=120)

        def complete(i: int) -> int:
            answer = client.completions.create(
                model=MODEL, prompt=f"Request {i}: the river", max_tokens=12,
                temperature=0, extra_body={"ignore_eos": True})
            return answer.usage.completion_tokens

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
