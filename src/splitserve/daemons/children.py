"""The daemons `splitserve up` starts besides the workers (router, planner): each a
`splitserve <command> --config F` subprocess with its log file, in its own session (a
Ctrl-C in the terminal reaches `up`, which stops them in order)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from splitserve.errors import SplitserveError


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


def wait_until(name: str, process: subprocess.Popen[bytes] | None, ready: Callable[[], bool],
               timeout_s: float, log_path: Path, waiting_for: str = "ready") -> None:
    """Poll `ready()` every 0.3 s; SplitserveError (naming the log) if the daemon exits or
    `timeout_s` passes first."""
    assert process is not None, f"the {name} was not started"
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None:
            raise SplitserveError(f"the {name} exited with {process.returncode}; "
                                  f"see {log_path}")
        if time.monotonic() > deadline:
            raise SplitserveError(f"the {name} was not {waiting_for} within {timeout_s:.0f} s; "
                                  f"see {log_path}")
        time.sleep(0.3)
