"""The pieces of gRPC security that need no server: the tokens file's parser (errors
name the line, never the token), the constant-time lookup, the guard's decision table,
URL redaction, and the TLS/auth config checks."""

from __future__ import annotations

import grpc
import pytest

from splitserve.config.security import AuthConfig, TlsConfig
from splitserve.control.auth import Guard, TokenFile, parse_tokens
from splitserve.errors import ConfigError
from splitserve.redact import redact_url

ADMIN = "a" * 24
MONITOR = "m" * 24
CLIENT = "c" * 24
TOKENS = f"""# comment
admin admin:read,admin:write,generate {ADMIN}
monitor admin:read {MONITOR}   # trailing comment

client generate {CLIENT}
"""


@pytest.mark.parametrize("line,message", [
    ("admin admin:read", "expected NAME SCOPES TOKEN"),
    (f"admin admin:root {ADMIN}", "unknown scope 'admin:root'"),
    ("admin admin:read short-token", "token 'admin' is shorter than 16 characters"),
    (f"a admin:read {ADMIN}\nb generate {ADMIN}", "token 'b' repeats an earlier line's token"),
])
def test_a_bad_tokens_file_names_the_line_and_never_the_token(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_tokens(line, "/etc/t")
    assert message in str(err.value)
    assert str(err.value).startswith("/etc/t:")
    assert ADMIN not in str(err.value) and "short-token" not in str(err.value)


def test_tokens_are_looked_up_by_digest(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    tokens = TokenFile(str(path))
    assert [t.name for t in tokens.tokens()] == ["admin", "monitor", "client"]
    entry = tokens.lookup(MONITOR)
    assert entry is not None and (entry.name, entry.scopes) == ("monitor",
                                                                frozenset({"admin:read"}))
    assert tokens.lookup(MONITOR + "x") is None and tokens.lookup("") is None
    assert all(MONITOR.encode() not in t.digest for t in tokens.tokens())


def test_a_missing_tokens_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        TokenFile(str(tmp_path / "absent"))


def guard(tmp_path, mutual: bool = False, **auth: object) -> Guard:
    path = tmp_path / "tokens"
    path.write_text(TOKENS)
    tls = TlsConfig("c.pem", "c.key", "ca.pem" if mutual else "")
    return Guard(AuthConfig(tokens_file=str(path), **auth), tls)  # type: ignore[arg-type]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def code(g: Guard, method: str, metadata: object = ()) -> grpc.StatusCode:
    refusal = g.check(method, metadata)
    return grpc.StatusCode.OK if refusal is None else refusal.code


def test_the_guard_decides_by_method_scope_and_credential(tmp_path) -> None:
    g = guard(tmp_path)
    ok, unauth, denied = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
                          grpc.StatusCode.PERMISSION_DENIED)
    status, drain = "/splitserve.v1.Admin/GetStatus", "/splitserve.v1.Admin/Drain"
    assert code(g, "/grpc.health.v1.Health/Check") is ok
    assert code(g, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is ok
    assert code(g, "/splitserve.v1.Generation/Generate") is ok  # require_generate off
    assert code(g, status) is unauth
    assert code(g, status, bearer("x" * 24)) is unauth
    assert code(g, status, (("authorization", f"Basic {ADMIN}"),)) is unauth
    assert code(g, status, bearer(MONITOR)) is ok
    assert code(g, drain, bearer(MONITOR)) is denied
    assert code(g, drain, bearer(ADMIN)) is ok
    assert code(g, "/splitserve.v1.Planner/SetMode", bearer(MONITOR)) is denied  # unlisted
    refusal = g.check(drain, bearer(MONITOR))
    assert refusal is not None and MONITOR not in refusal.details
    assert refusal.details == ("token 'monitor' lacks scope 'admin:write' for "
                               "/splitserve.v1.Admin/Drain")

    keys = guard(tmp_path, require_generate=True)
    generate = "/splitserve.v1.Generation/Generate"
    assert code(keys, generate) is unauth
    assert code(keys, generate, bearer(CLIENT)) is ok
    assert code(keys, generate, bearer(MONITOR)) is denied

    mtls = guard(tmp_path, mutual=True, mtls_scopes=("admin:read",))
    assert code(mtls, status) is ok  # the handshake verified a client certificate
    assert code(mtls, drain) is denied
    assert code(mtls, status, bearer("x" * 24)) is unauth  # a bad token is never ignored


@pytest.mark.parametrize("url,shown", [
    ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    ("nats://alice:s3cret@10.0.0.5:4222", "nats://alice:***@10.0.0.5:4222"),
    ("nats://s3cret-token@10.0.0.5:4222", "nats://***@10.0.0.5:4222"),
    ("nats://a:p1@h1:4222,nats://b:p2@h2:4223", "nats://a:***@h1:4222,nats://b:***@h2:4223"),
    ("tls://u:p@w:rd@host:4222", "tls://u:***@host:4222"),
])
def test_urls_lose_their_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_tls_and_auth_configs_are_checked() -> None:
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        TlsConfig(cert_file="c.pem")
    with pytest.raises(ConfigError, match="needs cert_file and key_file"):
        TlsConfig(client_ca_file="ca.pem")
    with pytest.raises(ConfigError, match="unknown scope 'root'"):
        AuthConfig(mtls_scopes=("root",))
    with pytest.raises(ConfigError, match="needs auth.tokens_file"):
        AuthConfig(require_generate=True)
    assert TlsConfig("c", "k", "ca").mutual and not TlsConfig("c", "k").mutual
