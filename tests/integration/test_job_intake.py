"""A prefill worker's job intake (worker/intake.py) on a real broker: an idle worker
polls every consumer at once, no job a poll brings is lost or held back, and a held job
goes after a higher-priority one that came since (unless held past `max_hold_s`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from test_queue_work import make_job

from splitserve.queue.connection import BrokerConnection
from splitserve.queue.settings import PrefillQueueSettings
from splitserve.queue.streams import (
    direct_consumer_config,
    ensure_prefill_queue,
    shared_consumer_config,
)
from splitserve.queue.subjects import STREAM_PREFILL
from splitserve.queue.work_queue import JobConsumer, JobDelivery, publish_job
from splitserve.worker.intake import JobIntake, hand_back

pytestmark = pytest.mark.timeout(60)

# AckWait far above every wait below: a job seen again came back by a nak, not by AckWait
SETTINGS = PrefillQueueSettings(ack_wait_s=30.0, max_deliver=5)
IDLE_POLL_S = 4.0  # polled in turn, a normal job would wait out 2 polls of 1 s each


async def consumers(conn: BrokerConnection) -> list[JobConsumer]:
    """The worker's order: direct, then shared by priority (high, normal, low)."""
    await ensure_prefill_queue(conn.js, SETTINGS)
    configs = [direct_consumer_config("prefill-0", SETTINGS)] + [
        shared_consumer_config(p, SETTINGS) for p in SETTINGS.priorities]
    return [await JobConsumer.bind(conn.js, c) for c in configs]


@pytest.fixture
async def intake(nats_conn: BrokerConnection) -> AsyncIterator[JobIntake]:
    intake = JobIntake(await consumers(nats_conn), IDLE_POLL_S)
    yield intake
    await intake.close()


async def two_jobs_for_one_slot(conn: BrokerConnection, intake: JobIntake) -> list[JobDelivery]:
    """An idle intake with room for one job, and a job on two consumers at once: what
    the fetch returns (the other job is pulled or on its way)."""
    fetch = asyncio.create_task(intake.fetch(1, window_s=0.0))
    await asyncio.sleep(0.3)  # every consumer is being long-polled now
    await asyncio.gather(publish_job(conn.js, make_job("req-high", priority="high")),
                         publish_job(conn.js, make_job("req-low", priority="low")))
    return await fetch


async def collect_the_other_poll(intake: JobIntake) -> None:
    """The other poll's job is held once a fetch collects it: at once when that poll had
    ended by the first fetch's return, else a fetch for no jobs (it waits for the poll
    and takes nothing) picks it up."""
    deadline = time.monotonic() + 2.0
    while intake.num_held == 0 and time.monotonic() < deadline:
        await intake.fetch(0, window_s=0.0)


async def num_stored(conn: BrokerConnection) -> int:
    return int((await conn.js.stream_info(STREAM_PREFILL)).state.messages)


async def test_an_idle_intake_takes_a_job_from_any_consumer_at_once(
        nats_conn: BrokerConnection, intake: JobIntake) -> None:
    assert SETTINGS.priorities[-1] == "low"  # the last consumer polled in turn
    fetch = asyncio.create_task(intake.fetch(8, window_s=0.01))
    await asyncio.sleep(0.3)  # every consumer is being long-polled now
    assert intake.num_polls == len(intake.consumers)
    published = time.monotonic()
    await publish_job(nats_conn.js, make_job("req-low", priority="low"))
    [delivery] = await fetch
    assert delivery.request_id == "req-low"
    assert time.monotonic() - published < 1.0  # in turn: ≥ 3 polls of 1 s first
    await delivery.ack()


async def test_jobs_beyond_the_room_wait_for_the_next_fetch(
        nats_conn: BrokerConnection, intake: JobIntake) -> None:
    first = await two_jobs_for_one_slot(nats_conn, intake)
    await asyncio.sleep(0.3)  # the other poll has its job by now, if it was not first
    second = await intake.fetch(1, window_s=0.0)
    got = [d.request_id for d in first + second]
    assert len(first) == len(second) == 1 and sorted(got) == ["req-high", "req-low"]
    for delivery in first + second:
        await delivery.ack()
    assert intake.num_held == 0 and await num_stored(nats_conn) == 0


async def test_settle_and_close_hand_back_what_was_pulled(
        nats_conn: BrokerConnection, intake: JobIntake) -> None:
    [taken] = await two_jobs_for_one_slot(nats_conn, intake)
    held = await intake.settle()  # a drain: waits for every poll, returns what is held
    assert intake.num_polls == 0 and intake.num_held == 0
    assert len(held) == 1 and {taken.request_id, held[0].request_id} == {"req-high",
                                                                          "req-low"}
    for delivery in held:
        await hand_back(delivery, "test drain")
    await taken.ack()
    # Handed back: here again at once, not after AckWait (30 s).
    [again] = await intake.fetch(8, window_s=0.0)
    assert again.request_id == held[0].request_id and again.num_delivered == 2
    await again.ack()
    assert await num_stored(nats_conn) == 0


async def test_close_hands_back_the_jobs_it_holds(nats_conn: BrokerConnection) -> None:
    intake = JobIntake(await consumers(nats_conn), IDLE_POLL_S)
    [taken] = await two_jobs_for_one_slot(nats_conn, intake)
    await collect_the_other_poll(intake)
    assert intake.num_held == 1  # the other poll's job, pulled and not handed out
    await intake.close()
    await taken.ack()
    successor = JobIntake(await consumers(nats_conn), IDLE_POLL_S)
    try:
        [again] = await asyncio.wait_for(successor.fetch(8, window_s=0.0), timeout=3.0)
        assert again.request_id != taken.request_id and again.num_delivered == 2
        await again.ack()
    finally:
        await successor.close()
    assert await num_stored(nats_conn) == 0


async def held_then_high(conn: BrokerConnection, intake: JobIntake, hold_s: float
                         ) -> tuple[JobDelivery, list[JobDelivery]]:
    """A normal and a low job for one slot (one handed out, the other held), then,
    `hold_s` later, a high one: the first fetch's job and the next two fetches' jobs."""
    fetch = asyncio.create_task(intake.fetch(1, window_s=0.0))
    await asyncio.sleep(0.3)  # every consumer is being long-polled now
    await asyncio.gather(publish_job(conn.js, make_job("req-normal", priority="normal")),
                         publish_job(conn.js, make_job("req-low", priority="low")))
    [first] = await fetch
    await collect_the_other_poll(intake)
    await asyncio.sleep(hold_s)
    assert intake.num_held == 1
    await publish_job(conn.js, make_job("req-high", priority="high"))
    await asyncio.sleep(0.3)  # the high consumer's poll has it by now
    then = [d for _ in range(2) for d in await intake.fetch(1, window_s=0.0)]
    for delivery in [first, *then]:
        await delivery.ack()
    assert intake.num_held == 0 and await num_stored(conn) == 0
    return first, then


@pytest.mark.parametrize(("max_hold_s", "hold_s", "held_goes_first"), [
    (5.0, 0.0, False),  # a held job goes after a higher-priority job that came since
    (0.2, 0.3, True),  # unless it was held past max_hold_s
])
async def test_held_jobs_go_out_by_priority_until_held_too_long(
        nats_conn: BrokerConnection, max_hold_s: float, hold_s: float,
        held_goes_first: bool) -> None:
    intake = JobIntake(await consumers(nats_conn), IDLE_POLL_S, max_hold_s=max_hold_s)
    try:
        first, then = await held_then_high(nats_conn, intake, hold_s)
    finally:
        await intake.close()
    held = ({"req-normal", "req-low"} - {first.request_id}).pop()
    expected = [held, "req-high"] if held_goes_first else ["req-high", held]
    assert [d.request_id for d in then] == expected
