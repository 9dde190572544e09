"""The transfer benchmark runs end to end on a tiny configuration and reports its ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_transfer.py"


@pytest.mark.timeout(120)
def test_kv_transfer_benchmark_json() -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--json", "--page-sizes", "16", "--prompts", "128",
         "--iters", "2"],
        capture_output=True, text=True, timeout=110, check=True,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    cases = report["cases"]
    assert [(c["layout"], c["num_descriptors"]) for c in cases] == [
        ("contiguous", 1), ("scattered", 8)
    ]
    for case in cases:
        assert case["bytes"] == 8 * 16 * 23040
        assert case["ratio_vs_memcpy"] > 0 and case["transfer_gbps"] > 0
        assert case["notify_median_us"] > 0
    assert cases[1]["extra_descriptors"] == 7
    assert report["descriptor_cost"]["num_descriptors"] == 512
    assert 0 <= report["receiver_idle_cpu_fraction"]["16"] < 0.5
    assert "contiguous_512_goal_met" in report["summary"]
