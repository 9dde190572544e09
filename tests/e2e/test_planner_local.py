"""The planner's `local` actuator starts and stops real worker processes.

A broker and decode-0 alone; the planner in `auto` with `min_prefill: 1` and the local
actuator: it starts `local-0` as a prefill worker from the template, which registers and
prefills decode-0's long prompts (output equal to the single-process engine's). Stopped
with SIGTERM, the planner stops the worker it started (it drains and exits 0) and
leaves decode-0 alone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cluster import (
    GRPCURL,
    SPLITSERVE,
    admin_status,
    generate,
    nats_server,
    start_daemon,
    stop_daemons,
    wait_ready,
    worker_config,
)

from splitserve.config.daemon import config_to_yaml
from splitserve.engine.sampling import SamplingParams
from splitserve.queue.broker import find_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_planner_starts_a_prefill_worker_and_stops_it_with_itself(
        tmp_path: Path, smollm, smollm_engine) -> None:  # type: ignore[no-untyped-def]
    prompt = smollm.tokenizer.encode("Tell me about the history of Paris. " * 12)
    reference = smollm_engine().generate([prompt], SamplingParams(max_tokens=8,
                                                                  temperature=0))[0]
    broker = nats_server(tmp_path)
    decode = start_daemon(worker_config("decode", "decode-0", broker.url), tmp_path)
    template = tmp_path / "local" / "worker.yaml"
    template.parent.mkdir()
    template.write_text(config_to_yaml(worker_config("decode", "", broker.url)))
    config = tmp_path / "planner.yaml"
    config.write_text(json.dumps({
        "grpc_address": f"127.0.0.1:{find_free_port()}", "nats_url": broker.url,
        "mode": "auto", "interval_s": 1, "log_level": "INFO",
        "actuator": {"kind": "local", "local_worker_config": str(template),
                     "local_max_workers": 2},
        "scaling": {"min_prefill": 1, "scale_up_cooldown_s": 0},
        "thresholds": {"enabled": False}}))
    planner_log = tmp_path / "planner.log"
    planner = subprocess.Popen([*SPLITSERVE, "planner", "--config", str(config)],
                               stdout=planner_log.open("wb"), stderr=subprocess.STDOUT)
    local_log = template.parent / "local-0.log"
    try:
        wait_ready([decode])
        deadline = time.monotonic() + 120
        while "registered" not in (local_log.read_text() if local_log.exists() else ""):
            assert planner.poll() is None, planner_log.read_text()[-3000:]
            assert time.monotonic() < deadline, planner_log.read_text()[-3000:]
            time.sleep(0.5)
        local_config = (template.parent / "local-0.yaml").read_text()
        assert "role: prefill" in local_config and "worker_id: local-0" in local_config
        time.sleep(2)  # decode-0 learns of the new prefill worker from the registry
        tokens, last = generate(decode.address, prompt, max_tokens=8)
        assert tokens == reference
        assert last.timing.prefill == "remote"  # type: ignore[attr-defined]
        status = admin_status(decode.address)
        assert int(status["counters"]["num_remote_prefills"]) == 1, status
        planner.send_signal(signal.SIGTERM)
        assert planner.wait(timeout=150) == 0, planner_log.read_text()[-3000:]
        # local-0 drained and deregistered (the registry lists decode-0 alone)
        listing = subprocess.run([GRPCURL, "-plaintext", decode.address,
                                  "splitserve.v1.Admin/ListWorkers"], capture_output=True,
                                 text=True, timeout=30, check=True)
        assert [w["worker_id"] for w in json.loads(listing.stdout)["workers"]] == ["decode-0"]
        assert admin_status(decode.address)["state"] == "SERVING_STATE_SERVING"
    finally:
        if planner.poll() is None:
            planner.kill()
            planner.wait()
        stop_daemons([decode])
        broker.stop()
    assert decode.exit_code() == 0, decode.log_tail()
