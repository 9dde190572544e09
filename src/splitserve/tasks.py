"""Background tasks that end when told to, and a stop that ends even when one does not.

Every daemon runs a few long-lived asyncio tasks (watches, feeds, publishers) and
stops them on the way out. Two things make "cancel it and await it" hang here:

- On Python 3.11, `asyncio.wait_for` swallows a cancellation that lands in the same
  loop tick as its inner result (it returns the result instead of raising; CPython
  gh-86296, fixed in 3.12). A task that loops over `wait_for` (ours, or a library's
  such as nats-py's `next_msg` and pull `fetch`) then runs on, and awaiting it never
  returns. Seen in CI as a worker that logged its engine crash and never exited.
  `stop_tasks` cancels again until the tasks end, within a bound; loops of our own
  use `asyncio.timeout`, which does not lose a cancellation.
- A stop can wait on peers and threads nobody controls (a broker, a NIXL agent, the
  interpreter joining threads). `arm_stop_deadline` bounds the whole way out: past
  the limit, every thread's stack goes to stderr (the journal) and the process leaves
  with STOP_HUNG_EXIT_CODE, so that systemd and `splitserve up` see a failed stop,
  with the place it stuck, instead of a SIGKILL after TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

STOP_TASKS_TIMEOUT_S = 10.0
_RECANCEL_EVERY_S = 0.1
STOP_DEADLINE_S = 20.0  # after the drain; units' TimeoutStopSec = 90 > 60 s grace + this
STOP_HUNG_EXIT_CODE = 70  # EX_SOFTWARE: the stop itself failed


def logged_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A background task whose crash is logged at once, not when it is garbage-collected."""
    task = asyncio.create_task(coro, name=name)

    def report(t: asyncio.Task[None]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("background task %s crashed", name, exc_info=t.exception())

    task.add_done_callback(report)
    return task


async def stop_tasks(*tasks: asyncio.Task[Any] | None,
                     timeout_s: float = STOP_TASKS_TIMEOUT_S) -> bool:
    """Cancel `tasks` (None entries are skipped) and wait until every one has ended,
    cancelling again every 0.1 s for a task that swallowed the cancellation. Their
    results and exceptions are dropped (logged_task logs crashes). Returns False, and
    logs which, when some task still runs after `timeout_s`."""
    pending = {t for t in tasks if t is not None and not t.done()}
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_EVERY_S)
        if pending and asyncio.get_running_loop().time() >= deadline:
            log.error("tasks still running %.0f s after cancellation: %s", timeout_s,
                      ", ".join(sorted(t.get_name() for t in pending)))
            return False
    return True


async def first_set(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def arm_stop_deadline(what: str, limit_s: float = STOP_DEADLINE_S) -> threading.Timer:
    """From now on the process has `limit_s` to exit; past it, dump every thread's
    stack to stderr and leave at once with STOP_HUNG_EXIT_CODE. The timer thread is a
    daemon thread: it never delays a normal exit."""

    def expire() -> None:
        log.error("%s: still stopping after %g s; every thread's stack follows, then "
                  "exit %d", what, limit_s, STOP_HUNG_EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(STOP_HUNG_EXIT_CODE)

    timer = threading.Timer(limit_s, expire)
    timer.name, timer.daemon = "stop deadline", True
    timer.start()
    return timer
