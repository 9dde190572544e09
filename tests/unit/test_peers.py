"""benchmarks/peers_workload.py: the workload file the peer runners read, their result
lines and splitserve's ratios (no peer is installed or run here)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _peers_workload() -> ModuleType:
    # benchmarks/ only while importing: its kernels.py would shadow the `kernels` package.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("peers_workload")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_workload_file_round_trip(tmp_path: Path) -> None:
    pw = _peers_workload()
    work = pw.Workload([[17, 18, 19], [5]], [4, 128], max_num_seqs=16, num_threads=2,
                       model="/m/x.gguf", dtype="bf16")
    pw.write_workload(tmp_path / "w.json", work)
    back = pw.read_workload(tmp_path / "w.json")
    assert back == work
    assert (back.num_output_tokens, back.max_seq_len) == (132, 129)


def test_workload_rejects_mismatched_lengths_and_dtypes(tmp_path: Path) -> None:
    pw = _peers_workload()
    with pytest.raises(ValueError, match="2 prompts but 1 output lengths"):
        pw.Workload([[1], [2]], [3], 16, 2, "m", "fp32")
    with pytest.raises(ValueError, match="fp16"):
        pw.Workload([[1]], [3], 16, 2, "m", "fp16")
    (tmp_path / "old.json").write_text('{"format": 0}')
    with pytest.raises(ValueError, match="format"):
        pw.read_workload(tmp_path / "old.json")


def test_result_is_the_last_json_object_line() -> None:
    pw = _peers_workload()
    stdout = ('INFO engine up {"not": json\n{"engine": "a", "n": 1}\n[1, 2]\n'
              '{"engine": "b", "n": 2}\nDone.\n')
    assert pw.parse_result(stdout) == {"engine": "b", "n": 2}
    with pytest.raises(ValueError, match="no JSON result"):
        pw.parse_result("compiling...\n[1]\n")


def test_ratios_are_splitserve_over_each_peer_and_skip_failures() -> None:
    pw = _peers_workload()
    results = {
        "fp32": {"splitserve": {"output_tokens_per_s": 100.0},
                 "vllm": {"output_tokens_per_s": 200.0},
                 "llamacpp": {"output_tokens_per_s": 80.0}},
        "bf16": {"splitserve": {"output_tokens_per_s": 150.0},
                 "vllm": {"error": "run failed"}},
        "q": {"splitserve": {"error": "oom"}, "vllm": {"output_tokens_per_s": 1.0}},
    }
    assert pw.ratios(results) == {
        "fp32": {"splitserve_over_vllm": 0.5, "splitserve_over_llamacpp": 1.25},
        "bf16": {},
    }

