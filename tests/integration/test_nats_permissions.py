"""Least privilege on a real nats-server (TLS, one user per identity, the permissions of
queue/permissions.py): no credentials or plaintext get no connection; a prefill identity
cannot publish a PrefillJob; a worker writes only its own registry key; only the admin
identity writes the policy bucket. A refused write stores nothing (counted on the
stream), and the refused client stays connected and useful."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
import pytest_asyncio

from splitserve.certs import broker_auth, init_certs
from splitserve.config.security import NatsAuthConfig
from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.connection import BrokerConnection, connect
from splitserve.queue.errors import BrokerUnavailable
from splitserve.queue.permissions import Role
from splitserve.queue.policy import PolicyStore
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.streams import ensure_prefill_stream
from splitserve.queue.subjects import STREAM_PREFILL, shared_subject

pytestmark = pytest.mark.timeout(120)

REFUSED = (TimeoutError, nats.errors.TimeoutError)  # the server drops it; no ack comes
WORKERS: list[tuple[str, Role]] = [("decode-0", "decode"), ("prefill-0", "prefill"),
                                   ("flex-0", "worker"), ("router", "router")]


@pytest.fixture
def secured(tmp_path: Path) -> tuple[NatsServer, dict[str, NatsAuthConfig]]:
    """The broker as `splitserve certs nats-auth` configures it: bcrypt hashes in its
    config, the passwords in the clients' files."""
    certs = tmp_path / "certs"
    init_certs(certs)
    auth = broker_auth(certs, WORKERS, hashed=True)
    assert all(f.read_text().strip() not in auth.config_text
               for f in auth.password_files.values())
    auths = {name: NatsAuthConfig(name, str(path), str(certs / "ca.pem"))
             for name, path in auth.password_files.items()}
    server = NatsServer(find_free_port(), tmp_path / "nats", config_text=auth.config_text)
    server.start()
    yield server, auths
    server.stop()


@pytest_asyncio.fixture
async def conns(secured: tuple[NatsServer, dict[str, NatsAuthConfig]]
                ) -> AsyncIterator[dict[str, BrokerConnection]]:
    server, auths = secured
    opened = {name: await connect(server.url, name=name, auth=auth, connect_timeout_s=10)
              for name, auth in auths.items()}
    yield opened
    for conn in opened.values():
        await conn.close()


async def test_no_credentials_and_no_tls_get_no_connection(
        secured: tuple[NatsServer, dict[str, NatsAuthConfig]]) -> None:
    server, auths = secured
    for auth in (NatsAuthConfig(), NatsAuthConfig(ca_file=auths["admin"].ca_file),
                 NatsAuthConfig("admin", auths["decode-0"].password_file,
                                auths["admin"].ca_file),  # someone else's password
                 NatsAuthConfig("admin", auths["admin"].password_file)):  # no TLS
        with pytest.raises(BrokerUnavailable):
            await connect(server.url, name="intruder", auth=auth, connect_timeout_s=2)


async def stream_messages(conn: BrokerConnection) -> int:
    return (await conn.js.stream_info(STREAM_PREFILL)).state.messages


async def test_only_decode_workers_publish_jobs(conns: dict[str, BrokerConnection]) -> None:
    decode, prefill = conns["decode-0"], conns["prefill-0"]
    await ensure_prefill_stream(decode.js, PrefillQueueSettings())
    ack = await decode.js.publish(shared_subject("normal"), b"job", timeout=5)
    assert ack.stream == STREAM_PREFILL
    with pytest.raises(REFUSED):
        await prefill.js.publish(shared_subject("normal"), b"forged job", timeout=1)
    for name in ("admin", "router"):
        with pytest.raises(REFUSED):
            await conns[name].js.publish(shared_subject("high"), b"forged job", timeout=1)
    assert await stream_messages(decode) == 1
    with pytest.raises(REFUSED):  # deleting the evidence is refused too
        await prefill.js.purge_stream(STREAM_PREFILL)
    assert await stream_messages(prefill) == 1  # and prefill still works


async def test_a_flippable_worker_may_do_what_both_roles_do(
        conns: dict[str, BrokerConnection]) -> None:
    flex = conns["flex-0"]
    await ensure_prefill_stream(conns["decode-0"].js, PrefillQueueSettings())
    ack = await flex.js.publish(shared_subject("normal"), b"job", timeout=5)  # as decode
    assert ack.stream == STREAM_PREFILL
    with pytest.raises(REFUSED):  # but still not another worker's registry key
        registry = await WorkerRegistry.open(flex.js, BucketSettings())
        await registry.register("decode-0", b"rogue")
    await flex.nc.flush(timeout=5)
    assert flex.nc.is_connected


async def test_a_worker_writes_only_its_own_registry_key(
        conns: dict[str, BrokerConnection]) -> None:
    decode = await WorkerRegistry.open(conns["decode-0"].js, BucketSettings())
    prefill = await WorkerRegistry.open(conns["prefill-0"].js, BucketSettings())
    await decode.register("decode-0", b"decode descriptor")
    await prefill.register("prefill-0", b"prefill descriptor")
    with pytest.raises(REFUSED):
        await decode.register("prefill-0", b"rogue agent")
    with pytest.raises(REFUSED):
        await prefill.register("decode-1", b"rogue agent")
    router = await WorkerRegistry.open(conns["router"].js, BucketSettings())
    with pytest.raises(REFUSED):  # the router only reads the registry
        await router.register("decode-0", b"rogue agent")
    assert await router.list() == {"decode-0": b"decode descriptor",
                                   "prefill-0": b"prefill descriptor"}
    kv = await conns["admin"].js.key_value("splitserve-workers")
    assert (await kv.get("prefill-0")).value == b"prefill descriptor"
    assert (await kv.get("decode-0")).value == b"decode descriptor"


async def test_only_the_admin_identity_writes_the_policy(
        conns: dict[str, BrokerConnection]) -> None:
    admin = await PolicyStore.open(conns["admin"].js, BucketSettings())
    revision = await admin.put("routing", b'{"prefill_length_threshold": 64}')
    for worker in ("decode-0", "prefill-0", "router"):
        store = await PolicyStore.open(conns[worker].js, BucketSettings())
        with pytest.raises(REFUSED):
            await store.put("routing", b'{"enable_remote_prefill": false}')
        entry = await store.get("routing")  # reading it is fine
        assert entry is not None and entry.revision == revision
