"""A prefill worker's job intake: which of its consumers it pulls from, and when.

The consumers come in the worker's order: its direct consumer, then the shared one
of each priority class, highest first. `fetch(max_jobs)`:
1. jobs pulled earlier and not handed out yet (a long poll can bring more than there
   was room for) go out by their consumer's rank, so a held low-priority job does not
   go before a high-priority one that came since; consumers ranked above every held
   job and not being polled are pulled quickly first. A held job passed over for
   `max_hold_s` goes first: it ages toward its lease and AckWait meanwhile;
2. with none held, a quick pass over the consumers, in order, takes the jobs already
   waiting;
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
import time
from dataclasses import dataclass, field

from splitserve.queue.errors import JobAlreadySettled
from splitserve.queue.work_queue import JobConsumer, JobDelivery
from splitserve.tasks import stop_tasks

log = logging.getLogger(__name__)

QUICK_PULL_S = 0.01  # the quick pass's pull per consumer
MAX_HOLD_S = 0.5  # a held job passed over this long goes first


@dataclass(frozen=True, order=True)
class Held:
    """A job pulled and not handed out yet; ordered by its consumer's rank, then age."""

    rank: int  # the consumer's index: direct, then high > normal > low
    since: float  # monotonic seconds when pulled
    delivery: JobDelivery = field(compare=False)


class JobIntake:
    def __init__(self, consumers: list[JobConsumer], idle_poll_s: float,
                 max_hold_s: float = MAX_HOLD_S) -> None:
        self.consumers = consumers
        self.idle_poll_s = idle_poll_s
        self.max_hold_s = max_hold_s
        self._polls: dict[int, asyncio.Task[list[JobDelivery]]] = {}  # by consumer index
        self._held: list[Held] = []

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
        # with jobs held, only the consumers that could overtake them
        await self._quick_pass(max_jobs, above=min(self._held).rank if self._held else None)
        if not self._held:
            await self._long_poll(max_jobs, window_s)
        return self._hand_out(max_jobs)

    async def settle(self) -> list[JobDelivery]:
        """Wait for the outstanding long polls; every job held, to be handed back."""
        if self._polls:
            await asyncio.wait(self._polls.values())
        self._collect()
        held, self._held = [h.delivery for h in sorted(self._held)], []
        return held

    async def close(self) -> None:
        """Cancel the long polls (the worker stops), hand back the jobs held, close
        the consumers."""
        await stop_tasks(*self._polls.values())
        self._polls.clear()
        for held in self._held:
            await hand_back(held.delivery, "worker stopping")
        self._held.clear()
        for consumer in self.consumers:
            await consumer.close()

    # --- internals ------------------------------------------------------------------
    def _hold(self, index: int, deliveries: list[JobDelivery]) -> None:
        now = time.monotonic()
        self._held.extend(Held(index, now, d) for d in deliveries)

    def _hand_out(self, max_jobs: int) -> list[JobDelivery]:
        """The best `max_jobs` held jobs: overdue ones first, then by rank and age."""
        overdue_at = time.monotonic() - self.max_hold_s
        self._held.sort(key=lambda h: (h.since > overdue_at, h))
        out, self._held = self._held[:max_jobs], self._held[max_jobs:]
        return [h.delivery for h in out]

    def _collect(self) -> list[int]:
        """Take the jobs of the finished long polls, in consumer order: the consumers
        that brought some. A poll that failed re-raises here (a closed connection ends
        the job loop, as before)."""
        brought = []
        for index in sorted(i for i, task in self._polls.items() if task.done()):
            if jobs := self._polls.pop(index).result():
                self._hold(index, jobs)
                brought.append(index)
        return brought

    async def _quick_pass(self, max_jobs: int, above: int | None = None) -> None:
        """Take up to `max_jobs` jobs waiting on the consumers (only those ranked above
        `above`, a held job's rank: what is taken now goes out before the held ones)."""
        taken = 0
        for index, consumer in enumerate(self.consumers[:above]):
            room = max_jobs - taken
            if room <= 0:
                return
            if index not in self._polls:  # two pulls on one subscription share its inbox
                jobs = await consumer.fetch(room, timeout_s=QUICK_PULL_S)
                self._hold(index, jobs)
                taken += len(jobs)

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
            self._hold(index, await self.consumers[index].fetch(room, window_s))


async def hand_back(delivery: JobDelivery, why: str) -> None:
    """Nak for redelivery at once (to this or another worker); no-op once settled."""
    with contextlib.suppress(JobAlreadySettled):
        if await delivery.nak():
            log.info("job %s:%d handed back (%s)", delivery.job.request_id,
                     delivery.job.attempt, why)
