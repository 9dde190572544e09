"""The `splitserve` console script, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "splitserve"
pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, check=False, timeout=300)


def test_generate_chat_answers_paris() -> None:
    res = run("generate", "--chat", "--prompt", "What is the capital of France?",
              "--max-tokens", "16", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


def test_model_info_prints_geometry() -> None:
    res = run("model", "info")
    assert res.returncode == 0, res.stderr
    assert "134,515,008" in res.stdout  # SmolLM2-135M
    assert "KV bytes per token             46,080" in res.stdout  # 30 layers·2·3 heads·64·4 B
    assert "KV bytes per page (16 tokens)  737,280" in res.stdout


def test_bad_arguments_exit_with_a_message_not_a_traceback() -> None:
    res = run("generate", "--prompt", "hi", "--max-tokens", "0")
    assert res.returncode == 1
    assert "max_tokens must be >= 1, got 0" in res.stderr
    assert "Traceback" not in res.stderr
    res = run("generate", "--prompt", "", "--max-tokens", "4")
    assert "prompt is empty" in res.stderr
    res = run("model", "info", "--model", "/nonexistent.gguf")
    assert res.returncode == 1 and "no such file or directory" in res.stderr
