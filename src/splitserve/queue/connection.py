"""Connect to the broker and stay connected.

Daemons must outlive broker restarts: the client reconnects forever, waiting
`initial_s * 2**n` (capped at `max_s`, +-20% jitter so a fleet does not reconnect in
lockstep) between attempts. Subscriptions are replayed by the client on reconnect;
JetStream requests in flight during the outage time out and are retried by the
callers (publish_job, JobConsumer.fetch, the registry heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from splitserve.config.security import NatsAuthConfig
from splitserve.errors import ConfigError
from splitserve.queue.errors import BrokerUnavailable
from splitserve.redact import host_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconnectBackoff:
    """Delay before reconnect attempt n (0-based): min(max_s, initial_s * 2**n) +-jitter."""

    initial_s: float = 0.1
    max_s: float = 2.0
    jitter: float = 0.2

    def delay_s(self, attempt: int) -> float:
        base = min(self.max_s, self.initial_s * (2 ** min(attempt, 30)))
        return base * random.uniform(1.0 - self.jitter, 1.0 + self.jitter)


class BrokerConnection:
    """One NATS connection with its JetStream context and a connected flag.

    `is_connected` is what a daemon reports in its status; `wait_connected()` lets a
    loop park until the broker is back instead of spinning on errors.
    """

    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self.js: JetStreamContext = nc.jetstream()
        self._connected = asyncio.Event()
        self._disconnected_at: float | None = None
        self._closing = False
        self.num_reconnects = 0

    @property
    def is_connected(self) -> bool:
        return self.nc.is_connected

    @property
    def is_closed(self) -> bool:
        return self.nc.is_closed

    async def wait_connected(self, timeout_s: float | None = None) -> bool:
        """True once connected; False if `timeout_s` passed first."""
        if self.nc.is_connected:
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        if not self.nc.is_closed:
            await self.nc.close()

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if self._closing:
            return
        if self._disconnected_at is None:
            self._disconnected_at = time.monotonic()
            log.warning("nats connection %s: disconnected from broker", self.name)

    async def _on_reconnected(self) -> None:
        self.num_reconnects += 1
        down_s = 0.0 if self._disconnected_at is None else time.monotonic() - self._disconnected_at
        self._disconnected_at = None
        self._connected.set()
        log.warning("nats connection %s: reconnected to %s after %.2fs", self.name,
                       host_port(self.nc.connected_url), down_s)

    async def _on_error(self, err: Exception) -> None:
        # While the broker is down every attempt fails; one line per attempt at
        # DEBUG, the disconnect itself is logged once at WARNING.
        # A refusal by the broker's permissions or authorization is a misconfiguration
        # (or an attack): WARNING, every time.
        refused = any(word in str(err).lower() for word in ("permissions violation",
                                                              "authorization violation"))
        log.log(logging.WARNING if refused else logging.DEBUG, "nats connection %s: %s: %s",
                   self.name, type(err).__name__, err)

    async def _on_closed(self) -> None:
        self._connected.clear()
        log.info("nats connection %s: closed", self.name)


NO_AUTH = NatsAuthConfig()
_CANCEL_RETRY_S = 0.1


async def connect(
    servers: str | Sequence[str],
    *,
    name: str = "splitserve",
    backoff: ReconnectBackoff = ReconnectBackoff(),
    connect_timeout_s: float | None = 30.0,
    auth: NatsAuthConfig = NO_AUTH,
) -> BrokerConnection:
    """Connect, retrying until `connect_timeout_s` (None: forever), and reconnect
    forever after that. Raises BrokerUnavailable if the first connect times out
    (wrong credentials included: the broker's refusal is logged), ConfigError if a
    password or CA file cannot be read."""
    credentials: dict[str, Any] = {}
    if auth.user:
        credentials.update(user=auth.user, password=auth.password())
    if auth.ca_file:
        try:
            credentials["tls"] = ssl.create_default_context(cafile=auth.ca_file)
        except OSError as exc:
            raise ConfigError(auth.ca_file, f"cannot read CA: {exc.strerror}") from None
    # "nats://a:4222,nats://b:4222" (a cluster, as `splitserve up` writes it): nats.py
    # takes a list, not a comma-separated string.
    server_list = ([s.strip() for s in servers.split(",") if s.strip()]
                   if isinstance(servers, str) else list(servers))
    nc = Client()
    conn = BrokerConnection(nc, name)

    def choose_server(pool: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        # `reconnects` counts failed attempts on that server since it last worked.
        server = min(pool, key=lambda s: s.reconnects)
        return server, backoff.delay_s(server.reconnects)

    start = time.monotonic()
    attempt = asyncio.ensure_future(nc.connect(
        servers=server_list,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        # Between attempts of the *first* connect; the handler paces reconnects.
        reconnect_time_wait=backoff.initial_s,  # type: ignore[arg-type]
        reconnect_to_server_handler=choose_server,
        connect_timeout=2,
        disconnected_cb=conn._on_disconnected,
        reconnected_cb=conn._on_reconnected,
        error_cb=conn._on_error,
        closed_cb=conn._on_closed,
        **credentials,
    ))
    try:
        await asyncio.wait({attempt}, timeout=connect_timeout_s)
    except asyncio.CancelledError:  # our caller gave up
        await _cancel_until_done(attempt)
        await conn.close()
        raise
    await _cancel_until_done(attempt)  # timed out (a no-op once connected)
    try:
        attempt.result()
    except BaseException as exc:
        await conn.close()  # as closing: no "disconnected" warning for a broker never reached
        if isinstance(exc, asyncio.CancelledError):  # by us, at the timeout
            raise BrokerUnavailable(server_list, time.monotonic() - start) from None
        raise
    conn._connected.set()
    log.info("nats connection %s: connected to %s", name,
                host_port(nc.connected_url) if nc.connected_url else "?")
    return conn


async def _cancel_until_done(task: asyncio.Future[Any]) -> None:
    """Cancel `task` until it ends. nats.py's first-connect loop retries forever, and
    one cancel can be lost in it (an inner `wait_for` whose read completes as the cancel
    arrives returns the line and swallows the cancel): that attempt then never ended."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_RETRY_S)
