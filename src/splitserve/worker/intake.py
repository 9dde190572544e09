"""A prefill worker's job intake: which of its consumers it pulls from, and when.

The consumers come in the worker's order: its direct consumer, then the shared one
of each priority class, highest first. `fetch(max_jobs)`:
1. jobs pulled earlier and not handed out yet come first (a long poll can bring more
   than there was room for);
2. a quick pass over the consumers, in order, takes the jobs already waiting;
3. with none waiting, every consumer is long-polled *at once* for one job; when the
   first ones arrive, the consumers that had a job are asked for more within the
   batching window. Polled in turn, as before, a job on the normal-priority consumer
   of an idle worker waited for the direct and high-priority polls to time out: up to
   250 ms of a short prompt's time to first token, spent idle.
A long poll is never cancelled while the worker runs: one that already took a job off
the subscription would strand it until AckWait. A poll still running when `fetch`
returns is kept; a later `fetch` takes what it brought. `settle()` waits for every
poll (a drain hands back what they bring), `close()` cancels them when the worker
stops and hands back the jobs it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from splitserve.queue.errors import JobAlreadySettled
from splitserve.queue.work_queue import JobConsumer, JobDelivery
from splitserve.tasks import stop_tasks

log = logging.getLogger(__name__)

QUICK_PULL_S = 0.01  # the quick pass's pull per consumer


class JobIntake:
    def __init__(self, consumers: list[JobConsumer], idle_poll_s: float) -> None:
        self.consumers = consumers
        self.idle_poll_s = idle_poll_s
        self._polls: dict[int, asyncio.Task[list[JobDelivery]]] = {}  # by consumer index
        self._held: deque[JobDelivery] = deque()  # pulled, not handed out yet

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def num_polls(self) -> int:
        """Long polls outstanding."""
        return len(self._polls)

    async def fetch(self, max_jobs: int, window_s: float) -> list[JobDelivery]:
        """Up to `max_jobs` jobs: those waiting now, else the first to arrive within
        the idle poll (then `window_s` for more); [] when none came."""
        self._collect()
        if not self._held:
            await self._quick_pass(max_jobs)
        if not self._held:
            await self._long_poll(max_jobs, window_s)
        return [self._held.popleft() for _ in range(min(max_jobs, len(self._held)))]

    async def settle(self) -> list[JobDelivery]:
        """Wait for the outstanding long polls; every job held, to be handed back."""
        if self._polls:
            await asyncio.wait(self._polls.values())
        self._collect()
        held, self._held = list(self._held), deque()
        return held

    async def close(self) -> None:
        """Cancel the long polls (the worker stops), hand back the jobs held, close
        the consumers."""
        await stop_tasks(*self._polls.values())
        self._polls.clear()
        for delivery in self._held:
            await hand_back(delivery, "worker stopping")
        self._held.clear()
        for consumer in self.consumers:
            await consumer.close()

    # --- internals ------------------------------------------------------------------
    def _collect(self) -> list[int]:
        """Take the jobs of the finished long polls, in consumer order: the consumers
        that brought some. A poll that failed re-raises here (a closed connection ends
        the job loop, as before)."""
        brought = []
        for index in sorted(i for i, task in self._polls.items() if task.done()):
            if jobs := self._polls.pop(index).result():
                self._held.extend(jobs)
                brought.append(index)
        return brought

    async def _quick_pass(self, max_jobs: int) -> None:
        for index, consumer in enumerate(self.consumers):
            room = max_jobs - len(self._held)
            if room <= 0:
                return
            if index not in self._polls:  # two pulls on one subscription share its inbox
                self._held.extend(await consumer.fetch(room, timeout_s=QUICK_PULL_S))

    async def _long_poll(self, max_jobs: int, window_s: float) -> None:
        for index, consumer in enumerate(self.consumers):
            if index not in self._polls:
                self._polls[index] = asyncio.create_task(
                    consumer.fetch_first(self.idle_poll_s), name=f"poll {consumer.name}")
        await asyncio.wait(self._polls.values(), timeout=self.idle_poll_s,
                           return_when=asyncio.FIRST_COMPLETED)
        for index in self._collect():  # the batching window, where jobs just came from
            room = max_jobs - len(self._held)
            if room <= 0 or window_s <= 0:
                return
            self._held.extend(await self.consumers[index].fetch(room, window_s))


async def hand_back(delivery: JobDelivery, why: str) -> None:
    """Nak for redelivery at once (to this or another worker); no-op once settled."""
    with contextlib.suppress(JobAlreadySettled):
        if await delivery.nak():
            log.info("job %s:%d handed back (%s)", delivery.job.request_id,
                     delivery.job.attempt, why)
