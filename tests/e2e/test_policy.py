"""Live policy over real daemons: an operator writes the splitserve-policy bucket with
`splitserve admin policy set` and the decode worker's next request is routed by the new
threshold, with no reload and no restart. The revision in force is read from
Admin/GetStatus through grpcurl; outputs are compared with the single-process engine."""

from __future__ import annotations

import json
import subprocess
import time

import cluster
import pytest
from test_faults import expected_outputs, long_prompts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WAIT_S = 10.0  # the watch applies a write within milliseconds; slack for a busy machine


def policy(nats_url: str, *args: str) -> str:
    """`splitserve admin policy ...` as an operator runs it; its output."""
    out = subprocess.run([*cluster.SPLITSERVE, "admin", "policy", *args, "--nats-url",
                          nats_url], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def wait_revision(address: str, revision: int) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        status = cluster.admin_status(address)
        if int(status.get("policy_revision", 0)) == revision:  # uint64: a JSON string
            return status
        assert time.monotonic() < deadline, f"revision {revision} not in force: {status}"
        time.sleep(0.05)


def test_a_policy_write_routes_the_next_request_by_the_new_threshold(
        tmp_path, smollm, smollm_engine) -> None:
    # The file says remote from 40 tokens (cluster.worker_config); the bucket overrides it.
    with cluster.decode_and_prefill(tmp_path) as (broker, decode, _):
        assert int(cluster.admin_status(decode.address).get("policy_revision", 0)) == 0
        prompts = long_prompts(smollm.tokenizer, 2, words=52)
        assert all(55 <= len(p) <= 70 for p in prompts), [len(p) for p in prompts]
        expected = expected_outputs(smollm_engine, prompts)

        local = json.loads(policy(broker.url, "set", "--json", "--revision", "0",
                                  "prefill_length_threshold=1000",
                                  "moderate_length_threshold=1000"))
        status = wait_revision(decode.address, local["revision"])
        assert status.get("policy_error", "") == ""
        tokens, last = cluster.generate(decode.address, prompts[0], 8)
        assert tokens == expected[0]
        assert last.timing.prefill == "local"

        remote = json.loads(policy(broker.url, "set", "--json", "prefill_length_threshold=40"))
        assert remote["value"] == {"prefill_length_threshold": 40,
                                   "moderate_length_threshold": 1000}
        wait_revision(decode.address, remote["revision"])
        tokens, last = cluster.generate(decode.address, prompts[1], 8)
        assert tokens == expected[1]
        assert (last.timing.prefill, last.timing.num_attempts) == ("remote", 1)

        counters = cluster.admin_status(decode.address)["counters"]
        assert (int(counters["num_local_prefills"]), int(counters["num_remote_prefills"])) == (
            1, 1)

        # deleted: the config file alone is in force again (revision 0)
        deleted = policy(broker.url, "delete")
        assert deleted.strip() == f"routing: revision {remote['revision']} deleted"
        wait_revision(decode.address, 0)
