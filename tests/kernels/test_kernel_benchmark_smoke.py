"""benchmarks/kernels.py --smoke --json runs and reports sane numbers (so it cannot rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_smoke_json():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels.py"), "--smoke", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["smoke"] is True
    assert {"machine", "shapes", "decode", "pages", "skipped"} <= result.keys()
    assert result["machine"]["torch"] == torch.__version__
    assert {s["name"] for s in result["shapes"]} == {"llama-32q-8kv-128d", "smollm2-9q-3kv-64d"}

    assert len(result["decode"]) == 4 and not result["skipped"]
    for case in result["decode"]:
        for key in ("bytes", "kernel_ms", "kernel_gbps", "copy_gbps", "fraction_of_copy",
                    "sdpa_ms", "speedup_vs_sdpa"):
            assert case[key] > 0, (key, case)
        assert case["num_splits"] >= 1
        assert case["max_abs_error_vs_sdpa"] < 2e-2  # bf16 output vs SDPA
    ops = sorted(case["op"] for case in result["pages"])
    assert ops == ["pack", "pack", "unpack", "unpack"]
    for case in result["pages"]:
        for key in ("bytes", "page_bytes", "kernel_ms", "kernel_gbps", "copy_gbps",
                    "fraction_of_copy"):
            assert case[key] > 0, (key, case)
