"""A decode worker's live routing policy (`worker.policy.PolicyView`) on a real broker:
a write applies within 1 s, a bad value is refused (the old one stays, the error is
reported), a delete reverts to the config file, a config reload changes the base under
the bucket's fields, and the watch survives a broker restart.

The config source stands in for `WorkerCore`: a reload swaps its `config` reference, as
`WorkerCore.apply_config` does (the view reads the routing through a callable)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest

from splitserve.config.daemon import WorkerConfig
from splitserve.queue.broker import NatsServer
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.policy import PolicyStore
from splitserve.queue.settings import BucketSettings
from splitserve.routing.offload import RoutingConfig
from splitserve.routing.policy import ROUTING_POLICY_KEY
from splitserve.worker import policy as policy_module
from splitserve.worker.policy import PolicyView

pytestmark = pytest.mark.timeout(60)

KEY = ROUTING_POLICY_KEY
SETTINGS = BucketSettings()


@dataclass
class ConfigSource:
    config: WorkerConfig

    def apply_config(self, config: WorkerConfig) -> None:
        self.config = config


@pytest.fixture
def core() -> ConfigSource:
    return ConfigSource(WorkerConfig(worker_id="decode-policy", routing=RoutingConfig(
        prefill_length_threshold=128, moderate_length_threshold=48)))


@pytest.fixture
async def store(nats_conn: BrokerConnection) -> PolicyStore:
    return await PolicyStore.open(nats_conn.js, SETTINGS)


@pytest.fixture
async def view(core: ConfigSource, nats_conn: BrokerConnection) -> AsyncIterator[PolicyView]:
    v = PolicyView(lambda: core.config.routing)
    await v.start(nats_conn, SETTINGS)
    yield v
    await v.stop()


async def within(seconds: float, done: Callable[[], bool], what: str) -> float:
    """How long `done()` took to turn true; fails after `seconds`."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def reload_file(core: ConfigSource, **routing: object) -> None:
    """What a config reload does: a new config with the file's routing swapped in."""
    core.apply_config(replace(core.config, routing=replace(core.config.routing, **routing)))


async def test_a_write_applies_within_a_second_and_a_bad_one_is_refused(
        core: ConfigSource, store: PolicyStore, view: PolicyView) -> None:
    assert (view.revision, view.error) == (0, "")
    assert view.routing is core.config.routing

    rev = await store.put(KEY, b'{"prefill_length_threshold": 40}')
    await within(1.0, lambda: view.revision == rev, "the write")
    assert view.routing == replace(core.config.routing, prefill_length_threshold=40)
    assert view.error == ""

    bad = await store.put(KEY, b'{"prefill_length_threshold": -5}')
    await within(1.0, lambda: view.error != "", "the refusal")
    assert view.error == (f"revision {bad} refused: routing.prefill_length_threshold: "
                          "must be >= 0, got -5")
    assert (view.revision, view.routing.prefill_length_threshold) == (rev, 40)

    garbage = await store.put(KEY, b"threshold=12")
    await within(1.0, lambda: view.error.startswith(f"revision {garbage} refused"), "garbage")
    assert "policy.routing: not valid JSON" in view.error
    assert (view.revision, view.routing.prefill_length_threshold) == (rev, 40)

    good = await store.put(KEY, b'{"prefill_length_threshold": 64, "max_remote_attempts": 1}')
    await within(1.0, lambda: view.revision == good, "the next valid write")
    assert view.error == ""
    assert (view.routing.prefill_length_threshold, view.routing.max_remote_attempts) == (64, 1)


async def test_a_file_reload_does_not_undo_a_bucket_write_and_a_delete_reverts(
        core: ConfigSource, store: PolicyStore, view: PolicyView) -> None:
    rev = await store.put(KEY, b'{"prefill_length_threshold": 40}')
    await within(1.0, lambda: view.revision == rev, "the write")

    reload_file(core, prefill_length_threshold=500, moderate_length_threshold=20)
    routing = view.routing
    assert routing.prefill_length_threshold == 40  # the bucket's field stays on top
    assert routing.moderate_length_threshold == 20  # the file's other fields apply
    assert view.revision == rev

    await store.delete(KEY)
    await within(1.0, lambda: view.revision == 0, "the delete")
    assert view.routing is core.config.routing
    assert view.routing.prefill_length_threshold == 500
    assert view.error == ""


async def test_the_bucket_is_read_at_start(core: ConfigSource, store: PolicyStore,
                                           nats_conn: BrokerConnection) -> None:
    rev = await store.put(KEY, b'{"moderate_length_threshold": 7}')
    view = PolicyView(lambda: core.config.routing)
    await view.start(nats_conn, SETTINGS)
    try:  # in force before the first request, not after a watch round trip
        assert (view.revision, view.routing.moderate_length_threshold) == (rev, 7)
    finally:
        await view.stop()

    bad = await store.put(KEY, b'{"moderate_length_threshhold": 7}')
    view = PolicyView(lambda: core.config.routing)
    await view.start(nats_conn, SETTINGS)
    try:  # a bad value at start: the file alone, and why
        assert view.revision == 0 and view.routing is core.config.routing
        assert view.error.startswith(f"revision {bad} refused: "
                                     "routing.moderate_length_threshhold: unknown setting")
    finally:
        await view.stop()


async def test_the_watch_survives_a_broker_restart(
        nats_server: NatsServer, nats_conn: BrokerConnection, core: ConfigSource,
        store: PolicyStore, view: PolicyView) -> None:
    rev = await store.put(KEY, b'{"prefill_length_threshold": 40}')
    await within(1.0, lambda: view.revision == rev, "the write")

    await asyncio.to_thread(nats_server.stop)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(nats_server.start)
    assert await nats_conn.wait_connected(timeout_s=10.0)
    assert view.routing.prefill_length_threshold == 40  # kept while the broker was away

    # Deleted at once: usually before the view's watch has restarted (it notices the
    # reconnect within 0.5 s), so only the new watch's snapshot can report it.
    await store.delete(KEY)
    await within(5.0, lambda: view.revision == 0, "a delete right after the restart")
    assert view.routing is core.config.routing
    rev2 = await store.put(KEY, b'{"prefill_length_threshold": 90}')
    await within(1.0, lambda: view.revision == rev2, "a write after the restart")
    assert view.routing.prefill_length_threshold == 90


async def test_a_broker_that_does_not_answer_at_start_does_not_stop_the_worker(
        nats_server: NatsServer, nats_conn: BrokerConnection, core: ConfigSource,
        store: PolicyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a 3-node cluster electing its leaders: the read at start times out. The view
    starts on the file's routing, and the watch delivers the key once the broker answers."""
    rev = await store.put(KEY, b'{"prefill_length_threshold": 40}')
    monkeypatch.setattr(policy_module, "READ_AT_START_S", 1.0)
    assert nats_server.pid is not None
    os.kill(nats_server.pid, signal.SIGSTOP)
    view = PolicyView(lambda: core.config.routing)
    try:
        await view.start(nats_conn, SETTINGS)  # nats requests time out (5 s): no raise
        assert (view.revision, view.routing) == (0, core.config.routing)
    finally:
        os.kill(nats_server.pid, signal.SIGCONT)
    try:
        await within(15.0, lambda: view.revision == rev, "the key once the broker answers")
        assert view.routing.prefill_length_threshold == 40
    finally:
        await view.stop()
