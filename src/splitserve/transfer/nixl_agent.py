"""The NIXL specifics: how an agent is created, which exceptions NIXL raises, its logs."""

from __future__ import annotations

import importlib
import logging
import os

from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

# Every exception the NIXL bindings raise (nixlRemoteDisconnectError, nixlBackendError,
# ...); they share no base class beyond Exception.
NIXL_ERRORS: tuple[type[BaseException], ...] = tuple(
    value
    for name, value in vars(importlib.import_module("nixl_cu12._bindings")).items()
    if name.startswith("nixl") and isinstance(value, type) and issubclass(value, Exception)
)


def new_nixl_agent(name: str) -> nixl_agent:
    """A NIXL agent with the UCX backend and no progress thread.

    The progress thread spins a whole core even when idle (NIXL's Python wrapper
    sets its delay to 0); the caller's polls drive progress instead (polling.py).
    Strict thread sync makes the agent safe if it is ever called from two threads.
    """
    route_nixl_logs()
    # UCX takes SIGHUP for its "debug mode" (UCX_DEBUG_SIGNO) when it loads, with the
    # first agent: the worker's config reload on SIGHUP would silently stop working.
    os.environ.setdefault("UCX_DEBUG_SIGNO", "0")
    config = nixl_agent_config(
        enable_prog_thread=False,
        backends=["UCX"],
        sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    return nixl_agent(name, config)


def route_nixl_logs() -> None:
    """Send NIXL's Python log records through the normal logging tree (stderr).

    NIXL configures its "nixl" logger with its own handler that prints INFO lines
    to stdout, which would mix with a CLI's stdout (e.g. `--json`); our own INFO
    lines already say what NIXL's do, so its level becomes WARNING unless
    NIXL_LOG_LEVEL asks otherwise.
    """
    nixl_logger = logging.getLogger("nixl")
    for handler in list(nixl_logger.handlers):
        nixl_logger.removeHandler(handler)
    nixl_logger.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        nixl_logger.setLevel(logging.WARNING)
