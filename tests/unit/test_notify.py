"""systemd notify protocol and watchdog (daemons/notify.py) against a real AF_UNIX
datagram socket and a real engine thread (tiny random-weight model)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from splitserve.daemons.notify import (
    EngineProbe,
    Notifier,
    monotonic_usec,
    run_watchdog,
    watchdog_period_s,
)
from splitserve.engine.async_engine import AsyncEngine

PERIOD_S = 0.1


def parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def received(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram queued on `sock` now, parsed."""
    messages = []
    while True:
        try:
            messages.append(parse(sock.recv(4096)))
        except BlockingIOError:
            return messages


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket (what systemd listens on) and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        yield sock, str(path)


def test_messages_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    before = monotonic_usec()
    notifier.ready("serving: decode worker d0")
    notifier.reloading("reloading config (SIGHUP)")
    notifier.stopping("draining\n(grace 5 s)")
    notifier.watchdog()
    got = received(sock)
    assert got[0] == {"READY": "1", "STATUS": "serving: decode worker d0"}
    assert got[1]["RELOADING"] == "1" and got[1]["STATUS"] == "reloading config (SIGHUP)"
    assert before <= int(got[1]["MONOTONIC_USEC"]) <= monotonic_usec()
    # a newline in STATUS would start another KEY=VALUE line
    assert got[2] == {"STOPPING": "1", "STATUS": "draining (grace 5 s)"}
    assert got[3] == {"WATCHDOG": "1"}
    assert notifier.state == "stopping"
    notifier.close()


def test_abstract_socket_name() -> None:
    name = f"splitserve-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.setblocking(False)
        Notifier(f"@{name}").ready("serving")
        assert received(sock) == [{"READY": "1", "STATUS": "serving"}]


def test_without_notify_socket_nothing_is_sent(listener: tuple[socket.socket, str]) -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.ready("serving")
    assert notifier.send(WATCHDOG=1) is False
    assert notifier.state == "ready"  # tracked all the same


def test_a_vanished_socket_never_raises(tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.send(READY=1) is False
    assert notifier.send(WATCHDOG=1) is False
    assert len([r for r in caplog.records if "notify socket" in r.getMessage()]) == 1


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "2000000"}, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 1.0),  # this process
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4243"}, None),  # another one
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_watchdog_period_is_half_the_interval(env: dict[str, str],
                                              expected: float | None) -> None:
    assert watchdog_period_s(env, pid=4242) == expected


async def wait_for_pings(sock: socket.socket, num_pings: int, timeout_s: float = 10.0,
                         ) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout_s
    while sum(m.get("WATCHDOG") == "1" for m in messages) < num_pings:
        assert time.monotonic() < deadline, f"only {messages} within {timeout_s} s"
        await asyncio.sleep(PERIOD_S / 2)
        messages += received(sock)
    return messages


@asynccontextmanager
async def watched_engine(tiny_engine, address: str) -> AsyncIterator[AsyncEngine]:
    """A running engine thread with `run_watchdog` pinging `address` (state: ready)."""
    engine = AsyncEngine(tiny_engine())
    await engine.start()
    notifier = Notifier(address)
    notifier.ready("serving")
    watchdog = asyncio.create_task(run_watchdog(notifier, PERIOD_S, EngineProbe(engine)))
    try:
        yield engine
    finally:
        watchdog.cancel()
        await engine.stop()


async def test_a_stuck_engine_thread_stops_the_pings(
        tiny_engine, listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    entered, release = threading.Event(), threading.Event()

    def stuck(_: object) -> None:  # a command that never returns until released
        entered.set()
        release.wait(30)

    async with watched_engine(tiny_engine, address) as engine:
        try:
            await wait_for_pings(sock, 3)
            blocked = engine.call(stuck)
            assert await asyncio.to_thread(entered.wait, 10)
            await asyncio.sleep(5 * PERIOD_S)  # a probe answered just before may still ping
            settling = received(sock)
            await asyncio.sleep(10 * PERIOD_S)
            during = received(sock)
            assert not [m for m in during if "WATCHDOG" in m], during
            # said once, when the first probe timed out
            assert [m["STATUS"] for m in settling + during if "STATUS" in m] == [
                "engine thread unresponsive: watchdog pings stopped"]

            release.set()
            await blocked
            after = await wait_for_pings(sock, 2)
            assert {"STATUS": "serving"} in after  # announced that the engine answers again
        finally:
            release.set()


async def test_the_status_says_when_the_engine_stops_answering(
        tiny_engine, listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    async with watched_engine(tiny_engine, address) as engine:
        await wait_for_pings(sock, 1)
        await engine.stop()  # a dead engine thread: its probe fails at once
        await asyncio.sleep(5 * PERIOD_S)
        messages = received(sock)
        status = [m["STATUS"] for m in messages if "STATUS" in m]
        assert status == ["engine thread unresponsive: watchdog pings stopped"]
        await asyncio.sleep(5 * PERIOD_S)
        assert received(sock) == []


async def test_a_blocked_event_loop_sends_no_pings(
        tiny_engine, listener: tuple[socket.socket, str]) -> None:
    sock, address = listener
    async with watched_engine(tiny_engine, address):
        await wait_for_pings(sock, 2)
        received(sock)
        time.sleep(10 * PERIOD_S)  # noqa: ASYNC251 (the point: the loop itself is stuck)
        assert received(sock) == []
        await wait_for_pings(sock, 2)  # and pings again once it runs
