"""A real `nats-server -js` per test (never a mocked broker).

`nats_server` runs on a free port with its own store dir under tmp_path; a test
may `stop()` and `start()` it again on the same port and store dir to exercise
broker restarts. `nats_conn` is a connected `BrokerConnection` with a short
reconnect backoff so restart tests stay fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.connection import BrokerConnection, ReconnectBackoff, connect
from splitserve.queue.errors import BrokerStartError

TEST_BACKOFF = ReconnectBackoff(initial_s=0.05, max_s=0.25)


def start_nats_server(store_dir: Path, num_tries: int = 3) -> NatsServer:
    """Start a broker on a free port; another process may grab the port between
    choosing and binding it, so try a few."""
    for attempt in range(num_tries):
        server = NatsServer(find_free_port(), store_dir, start_timeout_s=10.0)
        try:
            server.start()
        except BrokerStartError:
            if attempt == num_tries - 1:
                raise
            continue
        return server
    raise AssertionError("unreachable")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path / "nats-store")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nats_conn(nats_server: NatsServer) -> AsyncIterator[BrokerConnection]:
    conn = await connect(nats_server.url, name="test", backoff=TEST_BACKOFF, connect_timeout_s=5.0)
    try:
        yield conn
    finally:
        await conn.close()
