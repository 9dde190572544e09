"""systemd's notify protocol and watchdog for the worker daemons (`Type=notify` units).

The protocol (sd_notify(3)): systemd puts the path of an AF_UNIX datagram socket in
`NOTIFY_SOCKET` (a leading `@` names a socket in the abstract namespace, i.e. a NUL
byte); the service sends it datagrams of newline-separated `KEY=VALUE` lines:

- `READY=1`: start-up finished (a `Type=notify` unit is "active" only then), and
  again after a reload;
- `RELOADING=1` with `MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`: a reload began (the
  unit is "reloading" until the next `READY=1`; `Type=notify-reload`, systemd ≥ 253,
  requires the timestamp, older systemd ignores it);
- `STOPPING=1`: shutting down (here: the drain began);
- `STATUS=<one line>`: shown by `systemctl status`;
- `WATCHDOG=1`: "still alive". With `WatchdogSec=` systemd sets `WATCHDOG_USEC` (and
  `WATCHDOG_PID`, the process meant to ping) and kills the service (`WatchdogSignal=`,
  SIGABRT by default, then `Restart=` applies) when no ping came within that time. The
  watchdog is armed once start-up completed (after `READY=1`).

Without `NOTIFY_SOCKET` (not under systemd, tests, `splitserve up`) every call is a
no-op. A send that fails is logged once and never raises: systemd going away must not
take the worker down. Only a path or abstract socket is supported (not `vsock:`).

The watchdog (`run_watchdog`) pings every `WATCHDOG_USEC / 2` from the event loop, and
only after a round trip through the engine thread (`EngineProbe`) came back within
that half-interval. A blocked event loop sends nothing, and neither does a loop whose
engine thread is stuck (a step or a command that never returns) or dead: either way
systemd restarts the worker after `WatchdogSec`.

Why not a library: `sdnotify` (PyPI, last release 2017) has no watchdog helpers and
swallows every error; `systemd-python` builds against libsystemd's headers, which are
not installed here (`pip wheel systemd-python` fails). The protocol is a few lines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from splitserve.engine.async_engine import AsyncEngine, EngineStopped

log = logging.getLogger(__name__)

State = Literal["starting", "ready", "reloading", "stopping"]


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def socket_address(notify_socket: str) -> str | bytes:
    """The address to `sendto`: a path, or bytes starting with NUL for an abstract name."""
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    return notify_socket


def watchdog_period_s(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """How often to ping (half of `WATCHDOG_USEC`), or None when no watchdog is asked
    for this process (unset, not a positive integer, or `WATCHDOG_PID` is another pid)."""
    env = os.environ if environ is None else environ
    usec, owner = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2 / 1e6


def _one_line(text: str) -> str:
    return " ".join(text.split())  # a newline would start another KEY=VALUE


class Notifier:
    """Sends notifications to systemd's socket and tracks what it last said (`state`).

    `address` is `NOTIFY_SOCKET`'s value; "" makes every method a no-op (the state is
    still tracked, so callers need no special case).
    """

    def __init__(self, address: str = "") -> None:
        self.address = address
        self.state: State = "starting"
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: Any) -> bool:
        """One datagram of `KEY=value` lines; whether it was sent."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), socket_address(self.address))
        except OSError as exc:
            if not self._failed:  # once: a gone socket would otherwise log every ping
                log.warning("systemd notify socket %s: %s (further failures not logged)",
                            self.address, exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str) -> None:
        self.state = "ready"
        self.send(READY=1, STATUS=status)

    def reloading(self, status: str) -> None:
        self.state = "reloading"
        self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS=status)

    def stopping(self, status: str) -> None:
        self.state = "stopping"
        self.send(STOPPING=1, STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class EngineProbe:
    """Is the engine thread alive? A no-op command must come back within the timeout.

    At most one probe is queued at a time: a stuck thread is not handed one more no-op
    per period, and a probe that answers late still counts when it answers.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._pending: asyncio.Future[None] | None = None

    async def __call__(self, timeout_s: float) -> bool:
        if self._pending is None:
            try:
                self._pending = self.engine.call(_no_op)
            except EngineStopped:
                return False
        try:
            await asyncio.wait_for(asyncio.shield(self._pending), timeout_s)
        except TimeoutError:
            return False  # keep waiting on the same probe next time
        except EngineStopped:
            self._pending = None
            return False
        self._pending = None
        return True


def _no_op(engine: object) -> None:
    return None


async def run_watchdog(notifier: Notifier, period_s: float,
                       alive: Callable[[float], Awaitable[bool]]) -> None:
    """Send `WATCHDOG=1` every `period_s` while `alive(timeout_s)` says so; run until
    cancelled. Logs (and shows in STATUS) each change between answering and not."""
    loop = asyncio.get_running_loop()
    answering = True
    while True:
        started = loop.time()
        ok = await alive(period_s)
        if ok:
            notifier.watchdog()
        if ok != answering:
            answering = ok
            if ok:
                log.info("watchdog: the engine thread answers again; pinging systemd")
                if notifier.state == "ready":
                    notifier.status("serving")
            else:
                log.error("watchdog: the engine thread did not answer within %.1f s; "
                          "no pings to systemd until it does", period_s)
                notifier.status("engine thread unresponsive: watchdog pings stopped")
        await asyncio.sleep(max(0.0, period_s - (loop.time() - started)))
