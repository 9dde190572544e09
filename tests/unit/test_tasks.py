"""tasks.py: stopping background tasks ends them even when a cancellation was swallowed
(Python 3.11's wait_for), and a hung stop ends the process with its stacks and exit 70.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from splitserve.tasks import STOP_HUNG_EXIT_CODE, stop_tasks


class Looper:
    """A task that loops over `asyncio.wait_for`, as watches and feeds do; `feed()`
    completes the pending wait, `n` counts the waits that returned."""

    def __init__(self) -> None:
        self.pending: asyncio.Future[int] | None = None
        self.n = 0

    async def run(self) -> None:
        while True:
            self.pending = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self.pending, 5)
            self.n += 1

    def feed(self) -> None:
        assert self.pending is not None
        if not self.pending.done():
            self.pending.set_result(1)


def test_stop_tasks_ends_a_task_whose_cancellation_was_swallowed() -> None:
    async def main() -> tuple[bool, bool, int]:
        looper = Looper()
        task = asyncio.create_task(looper.run())
        await asyncio.sleep(0)
        looper.feed()  # the inner wait completes and the cancel lands in the same tick
        stopped = asyncio.create_task(stop_tasks(task, timeout_s=5.0))
        for _ in range(50):  # keep feeding: every wait the task reaches returns at once
            await asyncio.sleep(0.01)
            looper.feed()
        return await stopped, task.done(), looper.n

    ended, done, _ = asyncio.run(main())
    assert ended and done


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for no longer swallows")
def test_a_single_cancel_is_lost_on_this_python() -> None:
    """Why stop_tasks cancels again: the race is real here."""
    async def main() -> bool:
        looper = Looper()
        task = asyncio.create_task(looper.run())
        await asyncio.sleep(0)
        looper.feed()
        task.cancel()
        await asyncio.sleep(0.05)
        alive = not task.done()
        await stop_tasks(task)
        return alive

    assert asyncio.run(main())


def test_stop_tasks_gives_up_on_a_task_that_refuses_and_says_so() -> None:
    async def stubborn(until: float) -> None:
        while time.monotonic() < until:  # ignores every cancellation for a second
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    async def main() -> tuple[bool, float, bool]:
        started = time.monotonic()
        task = asyncio.create_task(stubborn(started + 1.0), name="stubborn")
        await asyncio.sleep(0)  # a task cancelled before its first step never runs
        ended = await stop_tasks(task, None, timeout_s=0.3)
        elapsed_s = time.monotonic() - started
        return ended, elapsed_s, task.done()

    ended, elapsed_s, done = asyncio.run(main())
    assert not ended and not done and 0.3 <= elapsed_s < 1.0, (ended, elapsed_s, done)


def test_a_stop_that_hangs_exits_70_with_every_stack() -> None:
    script = textwrap.dedent("""
        import time
        from splitserve.tasks import arm_stop_deadline

        def stuck_in_shutdown():
            time.sleep(60)

        arm_stop_deadline("test daemon", limit_s=0.5)
        stuck_in_shutdown()
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                          timeout=30)
    assert done.returncode == STOP_HUNG_EXIT_CODE, done.stderr
    assert time.monotonic() - started < 20
    assert "test daemon: still stopping after 0.5 s" in done.stderr
    assert "stuck_in_shutdown" in done.stderr and "most recent call first" in done.stderr


def test_a_stop_that_ends_in_time_exits_normally() -> None:
    script = ("from splitserve.tasks import arm_stop_deadline\n"
              "arm_stop_deadline('test daemon', limit_s=30)\n"
              "raise SystemExit(1)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False,
                          timeout=30)
    assert done.returncode == 1 and time.monotonic() - started < 10
