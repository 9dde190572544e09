"""`splitserve admin policy get|set|delete` as an operator runs it, against a real
nats-server: values validated before they are written, compare-and-set on the
revision, one-line errors and exit status 1."""

from __future__ import annotations

import json
import sys

import pytest
from grpc_fixtures import run_tool

from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.policy import PolicyStore
from splitserve.queue.settings import BucketSettings

pytestmark = pytest.mark.timeout(90)


async def policy(server: NatsServer, *args: str) -> tuple[int, str, str]:
    return await run_tool(sys.executable, "-m", "splitserve.cli", "admin", "policy", *args,
                          "--nats-url", server.url)


def error_line(rc: int, stderr: str) -> str:
    assert rc == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_get_set_delete_with_compare_and_set(nats_server: NatsServer,
                                                   nats_conn: BrokerConnection) -> None:
    # No worker has created the bucket yet: a clear error, no bucket of the CLI's making.
    assert error_line(*(await policy(nats_server, "get"))[::2]) == (
        "Error: bucket splitserve-policy does not exist on this broker (a worker creates "
        "it when it first connects)")
    store = await PolicyStore.open(nats_conn.js, BucketSettings())

    rc, out, err = await policy(nats_server, "get", "--json")
    assert rc == 0, err
    assert json.loads(out) == {"key": "routing", "revision": 0, "value": None, "error": ""}

    rc, out, err = await policy(nats_server, "set", "prefill_length_threshold=40", "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert first["value"] == {"prefill_length_threshold": 40} and first["error"] == ""
    entry = await store.get("routing")
    assert entry is not None and entry.revision == first["revision"]
    assert json.loads(entry.value or b"") == {"prefill_length_threshold": 40}

    # field=value edits the value in force; --revision must be the current one
    rev1 = first["revision"]
    rc, out, err = await policy(nats_server, "set", "--revision", str(rev1),
                                "moderate_length_threshold=30", "--json")
    assert rc == 0, err
    rev2 = json.loads(out)["revision"]
    assert json.loads(out)["value"] == {"prefill_length_threshold": 40,
                                        "moderate_length_threshold": 30}

    rc, _, err = await policy(nats_server, "set", "--revision", str(rev1),
                              "prefill_length_threshold=50")
    assert error_line(rc, err) == f"Error: policy routing: expected revision {rev1}, found {rev2}"
    rc, _, err = await policy(nats_server, "set", "--revision", "0", "{}")
    assert error_line(rc, err) == f"Error: policy routing: expected revision 0, found {rev2}"

    # refused before writing, as the workers would refuse it
    rc, _, err = await policy(nats_server, "set", "prefill_length_threshold=-1")
    assert error_line(rc, err) == ("Error: routing.prefill_length_threshold: must be >= 0, "
                                   "got -1")
    rc, _, err = await policy(nats_server, "set", "prefill_length=40")
    assert error_line(rc, err).startswith("Error: routing.prefill_length: unknown setting")
    rc, _, err = await policy(nats_server, "set", "[40]")
    assert error_line(rc, err) == "Error: [40]: expected FIELD=VALUE (or one JSON object)"
    entry = await store.get("routing")
    assert entry is not None and entry.revision == rev2

    rc, out, err = await policy(nats_server, "get")
    assert rc == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["revision"] == str(rev2)
    assert json.loads(rows["value"]) == {"moderate_length_threshold": 30,
                                         "prefill_length_threshold": 40}

    rc, _, err = await policy(nats_server, "delete", "--revision", str(rev1))
    assert error_line(rc, err) == f"Error: policy routing: expected revision {rev1}, found {rev2}"
    rc, out, err = await policy(nats_server, "delete", "--revision", str(rev2))
    assert (rc, out.strip()) == (0, f"routing: revision {rev2} deleted"), err
    assert await store.get("routing") is None
    rc, out, err = await policy(nats_server, "delete")
    assert (rc, out.strip()) == (0, "routing: not set"), err


async def test_a_value_the_workers_refuse_is_shown_and_can_be_replaced(
        nats_server: NatsServer, nats_conn: BrokerConnection) -> None:
    store = await PolicyStore.open(nats_conn.js, BucketSettings())
    bad = await store.put("routing", b'{"max_remote_attempts": 99}')

    rc, out, err = await policy(nats_server, "get", "--json")
    assert rc == 0, err
    assert json.loads(out) == {"key": "routing", "revision": bad,
                               "value": {"max_remote_attempts": 99},
                               "error": "routing.max_remote_attempts: must be <= 16, got 99"}

    rc, out, err = await policy(nats_server, "set", "max_remote_attempts=2", "--json")
    assert rc == 0, err
    assert json.loads(out)["value"] == {"max_remote_attempts": 2}
    assert json.loads(out)["revision"] > bad


async def test_an_unreachable_broker_is_one_line() -> None:
    url = f"nats://127.0.0.1:{find_free_port()}"
    rc, _, err = await run_tool(sys.executable, "-m", "splitserve.cli", "admin", "policy",
                                "get", "--nats-url", url, "--connect-timeout", "0.5")
    assert error_line(rc, err) == f"Error: no NATS broker reachable at ['{url}'] after 0.5s"
