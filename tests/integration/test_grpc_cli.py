"""`splitserve generate --target` and `splitserve admin ...` as a user runs them."""

from __future__ import annotations

import json
import socket

import pytest
from grpc_fixtures import CAPITAL_PROMPT, SPLITSERVE, WORKER_ID, GrpcWorker, run_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def splitserve(*args: str) -> tuple[int, str, str]:
    return await run_tool(SPLITSERVE, *args)


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_generate_target_streams_from_the_worker(grpc_worker: GrpcWorker) -> None:
    rc, out, err = await splitserve("generate", "--target", grpc_worker.address, "--chat",
                                    "--prompt", CAPITAL_PROMPT, "--max-tokens", "16",
                                    "--temperature", "0")
    assert rc == 0, err
    assert "Paris" in out
    status = await grpc_worker.status()
    assert status.counters.num_requests_finished == 1  # it ran on the worker, not locally


async def test_generate_target_bad_input_exits_with_the_status(grpc_worker: GrpcWorker) -> None:
    rc, _, err = await splitserve("generate", "--target", grpc_worker.address,
                                    "--prompt", "hi", "--max-tokens", "0")
    assert rc == 1
    assert one_line_error(err) == "Error: INVALID_ARGUMENT: max_tokens must be >= 1, got 0"


async def test_admin_commands(grpc_worker: GrpcWorker) -> None:
    target = ("--target", grpc_worker.address)
    rc, out, err = await splitserve("admin", "status", *target)
    assert rc == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(
        ("worker", "state", "KV")))
    assert rows["worker"].split() == [WORKER_ID, "(decode)"]
    assert rows["state"].strip() == "SERVING"
    assert rows["KV"].split()[1:3] == ["0", "used,"]  # "KV pages  0 used, 64 free, ..."

    rc, out, err = await splitserve("admin", "status", *target, "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["worker_id"] == WORKER_ID and status["num_pages_total"] == 64
    assert status["counters"]["num_requests_finished"] == "0"  # uint64 → JSON string

    rc, out, err = await splitserve("admin", "workers", *target)
    assert rc == 0, err
    header, row = out.splitlines()
    assert header.split()[:3] == ["WORKER", "ROLE", "ADDRESS"]
    assert row.split()[:5] == [WORKER_ID, "decode", grpc_worker.address, "64", "16"]

    rc, out, err = await splitserve("admin", "drain", *target, "--grace", "0")
    assert (rc, out.strip()) == (0, "state DRAINING, 0 requests in flight"), err
    assert grpc_worker.admin.is_draining()
    rc, out, err = await splitserve("generate", *target, "--prompt", "hi", "--max-tokens", "2")
    assert rc == 1 and one_line_error(err).startswith("Error: UNAVAILABLE: worker is draining")
    rc, out, err = await splitserve("admin", "resume", *target, "--json")
    assert rc == 0, err
    assert json.loads(out) == {"state": "SERVING_STATE_SERVING"}
    assert not grpc_worker.admin.is_draining()


async def test_set_role_on_a_server_without_roles(grpc_worker: GrpcWorker) -> None:
    """A local engine server has no prefill role to switch to: FAILED_PRECONDITION; an
    unknown role never leaves the CLI."""
    target = ("--target", grpc_worker.address)
    rc, _, err = await splitserve("admin", "set-role", *target, "--role", "prefill",
                                  "--grace-s", "0")
    assert rc == 1
    assert one_line_error(err) == ("Error: FAILED_PRECONDITION: cannot switch roles: this "
                                   "daemon has no prefill or decode role")
    rc, _, err = await splitserve("admin", "set-role", *target, "--role", "router")
    assert rc == 2 and "'router' is not one of 'prefill', 'decode'" in err
    assert not grpc_worker.admin.is_draining()


async def test_unreachable_target_fails_with_one_line() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"
    for args in (("generate", "--prompt", "hi"), ("admin", "status")):
        rc, _, err = await splitserve(*args, "--target", target, "--connect-timeout", "0.5")
        assert rc == 1
        assert one_line_error(err) == (f"Error: UNAVAILABLE: cannot connect to {target} "
                                       "within 0.5s")
