"""`splitserve calibrate` on a real cluster (nats-server, a decode and a prefill daemon):
it measures both paths, plots them, and leaves the live policy as it found it (dry run)
or with the break-even written over the operator's other fields. Every request it sent
is accounted for in the decode worker's counters."""

from __future__ import annotations

import json
import subprocess

import cluster
import pytest
from test_policy import policy, wait_revision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

LENGTHS = (16, 64, 160)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def calibrate(address: str, nats_url: str, plot: str, *extra: str) -> dict:
    out = subprocess.run([*cluster.SPLITSERVE, "calibrate", "--target", address,
                          "--nats-url", nats_url, "--lengths", ",".join(map(str, LENGTHS)),
                          "--repeats", "1", "--plot", plot, "--json", *extra],
                         capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def check_measured(result: dict, plot: str) -> None:
    assert result["num_samples"] + result["num_discarded"] == 2 * len(LENGTHS)
    for path in ("local", "remote"):
        medians = result[path]["medians"]
        assert len(medians) >= 2, result
        assert all(m["ttft_ms"] > 0 for m in medians)
        assert {m["tokens"] for m in medians} <= set(LENGTHS)
    assert result["measured_tokens"] == [16, 160] or result["num_discarded"] > 0
    with open(plot, "rb") as png:
        assert png.read(8) == PNG_MAGIC


def test_calibrate_measures_both_paths_and_writes_the_break_even(tmp_path) -> None:
    with cluster.decode_and_prefill(tmp_path) as (broker, decode, _):
        # A dry run leaves the key as it was: unset.
        dry = calibrate(decode.address, broker.url, str(tmp_path / "dry.png"), "--dry-run")
        check_measured(dry, str(tmp_path / "dry.png"))
        assert dry["policy"]["value"] is None
        assert json.loads(policy(broker.url, "get", "--json"))["revision"] == 0
        wait_revision(decode.address, 0)

        # An operator's override stays; the break-even is written over it.
        before = json.loads(policy(broker.url, "set", "--json", "max_remote_attempts=1"))
        wet = calibrate(decode.address, broker.url, str(tmp_path / "wet.png"))
        check_measured(wet, str(tmp_path / "wet.png"))
        after = json.loads(policy(broker.url, "get", "--json"))
        if wet["break_even_tokens"] is None:  # remote nowhere faster here: left as it was
            assert after["value"] == before["value"]
        else:
            assert after["value"] == {"max_remote_attempts": 1,
                                      "prefill_length_threshold": wet["break_even_tokens"]}
        assert after["revision"] == wet["policy"]["revision"]
        assert after["value"] == wet["policy"]["value"]
        wait_revision(decode.address, after["revision"])

        # Every request sent (a warm-up per path and run, then one per length and path)
        # was prefilled once, on some path, and finished.
        counters = cluster.admin_status(decode.address)["counters"]
        num_sent = 2 * (2 + 2 * len(LENGTHS))
        assert int(counters["num_local_prefills"]) + int(counters["num_remote_prefills"]) == (
            num_sent)
        assert int(counters["num_requests_finished"]) == num_sent
