"""The daemons `splitserve up` starts besides the workers (router, planner): each a
`splitserve <command> --config F` subprocess with its log file, in its own session (a
Ctrl-C in the terminal reaches `up`, which stops them in order)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def start_daemon(command: str, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "splitserve.cli", command, "--config", str(config_path)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemon(process: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after `timeout_s`."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
