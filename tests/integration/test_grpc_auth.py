"""gRPC security on a real server: TLS from `splitserve certs init`, bearer tokens with
scopes, API keys on Generation, mTLS, plaintext refused on a TLS port, token rotation,
grpcurl and the CLI as the README shows them. Every refusal has its status code, and
the worker serves a normal request afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpc_fixtures import GRPCURL, SPLITSERVE, run_tool

from splitserve import client
from splitserve.certs import DEFAULT_GRANTS, init_certs, write_tokens
from splitserve.client import CallOptions, ClientSecurity, RpcFailed
from splitserve.config.security import AuthConfig, TlsConfig
from splitserve.control import auth as auth_module
from splitserve.control.local_admin import LocalAdminBackend
from splitserve.control.server import GrpcServer, ServerSecurity, start_grpc_server
from splitserve.engine.async_engine import AsyncEngine
from splitserve.worker.local import LocalGenerationService

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

Start = Callable[..., Awaitable[GrpcServer]]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_certs(directory)
    write_tokens(directory, DEFAULT_GRANTS)
    return directory


@pytest_asyncio.fixture
async def start(smollm_engine: Callable[..., Any]) -> AsyncIterator[Start]:
    """`await start(security)`: a worker (SmolLM2) behind that security."""
    engine = AsyncEngine(smollm_engine(num_pages=32))
    await engine.start()
    servers: list[GrpcServer] = []

    async def serve(security: ServerSecurity, address: str = "127.0.0.1:0") -> GrpcServer:
        admin = LocalAdminBackend(engine, worker_id="secure-0")
        server = await start_grpc_server(address, LocalGenerationService(engine), admin,
                                         security=security)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        await server.stop(0)
    await engine.stop()


def tls(certs: Path, mutual: bool = False) -> TlsConfig:
    return TlsConfig(str(certs / "server.pem"), str(certs / "server.key"),
                     str(certs / "ca.pem") if mutual else "")


def as_(certs: Path, token: str | None = None, identity: str | None = None,
        ca: bool = True) -> CallOptions:
    return CallOptions(ClientSecurity.from_files(
        str(certs / "ca.pem") if ca else "",
        str(certs / f"{identity}.pem") if identity else "",
        str(certs / f"{identity}.key") if identity else "",
        str(certs / f"{token}.token") if token else ""), connect_timeout_s=3.0)


async def code_of(call: Awaitable[Any]) -> str:
    try:
        await call
    except RpcFailed as exc:
        return exc.code
    return "OK"


async def generate(address: str, call: CallOptions) -> list[int]:
    request = client.generate_request(token_ids=[5, 6, 7], max_tokens=4, temperature=0.0,
                                      ignore_eos=True)
    return [t async for chunk in client.stream_generate(
        address, request, security=call.security, connect_timeout_s=call.connect_timeout_s)
        for t in chunk.token_ids]


async def test_tokens_and_scopes_over_tls(certs: Path, start: Start) -> None:
    refused: list[str] = []
    server = await start(ServerSecurity(tls(certs), AuthConfig(str(certs / "tokens")),
                                        on_refusal=lambda code: refused.append(code.name)))
    address = server.address
    assert await code_of(client.admin_status(address, as_(certs))) == "UNAUTHENTICATED"
    wrong = CallOptions(ClientSecurity(ca_file=str(certs / "ca.pem"), token="x" * 43))
    assert await code_of(client.admin_status(address, wrong)) == "UNAUTHENTICATED"
    status = await client.admin_status(address, as_(certs, "monitor"))
    assert status.worker_id == "secure-0"
    assert await code_of(client.admin_drain(address, 0.0, as_(certs, "monitor"))) == (
        "PERMISSION_DENIED")
    assert await code_of(client.admin_drain(address, 0.0, as_(certs, "admin"))) == "OK"
    assert await code_of(client.admin_resume(address, as_(certs, "admin"))) == "OK"
    # plain TCP to the TLS port: no connection at all
    assert await code_of(client.admin_status(address, CallOptions(connect_timeout_s=2.0))) == (
        "UNAVAILABLE")
    # Generation is open (no API key required); the worker still serves
    assert len(await generate(address, as_(certs))) == 4

    # grpcurl and the CLI, as the README shows them
    ca, token = str(certs / "ca.pem"), (certs / "monitor.token").read_text().strip()
    rc, out, err = await run_tool(GRPCURL, "-cacert", ca, address, "list")
    assert rc == 0 and "splitserve.v1.Admin" in out.split(), err
    rc, out, err = await run_tool(GRPCURL, "-cacert", ca, "-H", f"authorization: Bearer {token}",
                                  address, "splitserve.v1.Admin/GetStatus")
    assert rc == 0 and json.loads(out)["worker_id"] == "secure-0", err
    rc, out, err = await run_tool(GRPCURL, "-cacert", ca, address,
                                  "splitserve.v1.Admin/GetStatus")
    assert rc != 0 and "Unauthenticated" in err
    rc, out, err = await run_tool(SPLITSERVE, "admin", "status", "--target", address, "--json",
                                  "--tls-ca", ca, "--token-file", str(certs / "monitor.token"))
    assert rc == 0 and json.loads(out)["worker_id"] == "secure-0", err
    rc, out, err = await run_tool(SPLITSERVE, "admin", "drain", "--target", address,
                                  "--grace", "0", "--tls-ca", ca,
                                  "--token-file", str(certs / "monitor.token"))
    assert rc == 1 and err.startswith("Error: PERMISSION_DENIED: token 'monitor' lacks scope"), err
    assert token not in out + err
    # every refused call was reported (what the daemons' auth_refusals_total counts)
    assert sorted(refused) == ["PERMISSION_DENIED"] * 2 + ["UNAUTHENTICATED"] * 3


async def test_api_keys_on_generation(certs: Path, start: Start) -> None:
    server = await start(ServerSecurity(tls(certs), AuthConfig(str(certs / "tokens"),
                                                               require_generate=True)))
    with pytest.raises(RpcFailed) as err:
        await generate(server.address, as_(certs))
    assert err.value.code == "UNAUTHENTICATED"
    with pytest.raises(RpcFailed) as err:
        await generate(server.address, as_(certs, "monitor"))
    assert err.value.code == "PERMISSION_DENIED"
    assert len(await generate(server.address, as_(certs, "client"))) == 4


async def test_mtls_needs_a_certificate_and_grants_its_scopes(certs: Path, start: Start) -> None:
    server = await start(ServerSecurity(tls(certs, mutual=True),
                                        AuthConfig(mtls_scopes=("admin:read",))))
    address = server.address
    assert await code_of(client.admin_status(address, as_(certs))) == "UNAVAILABLE"  # no cert
    status = await client.admin_status(address, as_(certs, identity="admin"))
    assert status.worker_id == "secure-0"
    assert await code_of(client.admin_reload(address, as_(certs, identity="admin"))) == (
        "PERMISSION_DENIED")
    assert len(await generate(address, as_(certs, identity="decode"))) == 4


async def test_a_rotated_tokens_file_applies_without_a_restart(
        certs: Path, start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "RECHECK_S", 0.0)
    server = await start(ServerSecurity(auth=AuthConfig(str(certs / "tokens"))))
    plain = CallOptions(ClientSecurity(token=(certs / "monitor.token").read_text().strip()))
    assert (await client.admin_status(server.address, plain)).worker_id == "secure-0"
    new = "n" * 32
    (certs / "tokens").write_text(f"rotated admin:read {new}\n")
    await asyncio.sleep(0.05)
    assert await code_of(client.admin_status(server.address, plain)) == "UNAUTHENTICATED"
    fresh = CallOptions(ClientSecurity(token=new))
    assert (await client.admin_status(server.address, fresh)).worker_id == "secure-0"
    (certs / "tokens").write_text("rotated admin:read short\n")  # refused: the old stay
    await asyncio.sleep(0.05)
    assert (await client.admin_status(server.address, fresh)).worker_id == "secure-0"



async def test_an_open_server_off_loopback_is_warned_about(
        certs: Path, start: Start, caplog: pytest.LogCaptureFixture) -> None:
    from splitserve.control import server as server_module

    with caplog.at_level("WARNING", logger=server_module.__name__):
        await start(ServerSecurity(), address="0.0.0.0:0")
        await start(ServerSecurity(auth=AuthConfig(str(certs / "tokens"))), address="0.0.0.0:0")
        await start(ServerSecurity())  # loopback
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "without auth" in warnings[0], warnings
