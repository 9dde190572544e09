"""Who may call what on a daemon's gRPC server: bearer tokens with scopes, or an mTLS
client certificate.

A call's life through the guard (`AuthInterceptor`, before the request is decoded):
1. health and reflection are open (probes, `grpcurl list`); Generation is open unless
   `auth.require_generate`; every other method needs a scope (`METHOD_SCOPES`; a method
   not listed needs `admin:write`);
2. the credential: `authorization: Bearer <token>` metadata, looked up in the tokens
   file (SHA-256 digests compared in constant time, every entry compared); else, on an
   mTLS server, the client certificate the handshake already verified, with
   `auth.mtls_scopes`;
3. no credential, or a token that matches none → UNAUTHENTICATED; a credential without
   the method's scope → PERMISSION_DENIED. The refusal never echoes the token.

Tokens file: one token per line, `NAME SCOPES TOKEN`, scopes comma-separated from
`admin:read`, `admin:write`, `generate`; `#` starts a comment; tokens are at least 16
characters. The file is re-read when it changes (checked at most once a second): a
rotation needs no restart; a file that no longer parses keeps the tokens in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from splitserve.config.security import SCOPES, AuthConfig, TlsConfig
from splitserve.errors import ConfigError

log = logging.getLogger(__name__)

MIN_TOKEN_CHARS = 16
RECHECK_S = 1.0
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
GENERATE_METHOD = "/splitserve.v1.Generation/Generate"
METHOD_SCOPES = {
    "/splitserve.v1.Admin/GetStatus": "admin:read",
    "/splitserve.v1.Admin/ListWorkers": "admin:read",
    "/splitserve.v1.Admin/GetConfig": "admin:read",
    "/splitserve.v1.Admin/Drain": "admin:write",
    "/splitserve.v1.Admin/Resume": "admin:write",
    "/splitserve.v1.Admin/Reload": "admin:write",
    "/splitserve.v1.Admin/SetRole": "admin:write",  # drains, as Drain does
    "/splitserve.v1.Planner/GetPlan": "admin:read",
    "/splitserve.v1.Planner/History": "admin:read",
    "/splitserve.v1.Planner/SetMode": "admin:write",
    GENERATE_METHOD: "generate",
}
DEFAULT_SCOPE = "admin:write"


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: bytes  # SHA-256 of the token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> tuple[Token, ...]:
    """The tokens of a tokens file; ConfigError naming the line (never the token)."""
    tokens: list[Token] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(where, "expected NAME SCOPES TOKEN")
        name, scope_list, token = parts
        scopes = frozenset(scope_list.split(","))
        unknown = sorted(scopes - set(SCOPES))
        if unknown:
            raise ConfigError(where, f"unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
        if len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(where, f"token {name!r} is shorter than {MIN_TOKEN_CHARS} "
                              "characters")
        digest = _digest(token)
        if any(hmac.compare_digest(digest, t.digest) for t in tokens):
            raise ConfigError(where, f"token {name!r} repeats an earlier line's token")
        tokens.append(Token(name, scopes, digest))
    return tuple(tokens)


class TokenFile:
    """The tokens of `path`, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp = self._stat()  # OSError: ConfigError below
        self._tokens = self._read()
        self._checked_s = time.monotonic()

    def _stat(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise ConfigError(str(self.path), f"cannot read tokens file: {exc.strerror}") from None
        return st.st_mtime_ns, st.st_size

    def _read(self) -> tuple[Token, ...]:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(str(self.path), f"cannot read tokens file: {exc.strerror}") from None
        return parse_tokens(text, str(self.path))

    def tokens(self) -> tuple[Token, ...]:
        now = time.monotonic()
        if now - self._checked_s >= RECHECK_S:
            self._checked_s = now
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._tokens, self._stamp = self._read(), stamp
                    log.info("tokens file %s re-read: %d tokens", self.path, len(self._tokens))
            except ConfigError as exc:
                log.warning("tokens file changed but cannot be used (%s); the %d tokens in "
                            "force stay", exc, len(self._tokens))
        return self._tokens

    def lookup(self, token: str) -> Token | None:
        """The entry of `token`; every entry is compared, in constant time each."""
        digest, found = _digest(token), None
        for entry in self.tokens():
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found


REFUSAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def refusal_label(code: grpc.StatusCode) -> str:
    """The `code` label of an auth-refusals counter: unauthenticated, permission_denied."""
    return str(code.name).lower()


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    details: str


class Guard:
    """The decision for one call, from its method and metadata (see the module docstring)."""

    def __init__(self, auth: AuthConfig, tls: TlsConfig) -> None:
        self.auth = auth
        self.mutual = tls.mutual
        self.tokens = TokenFile(auth.tokens_file) if auth.tokens_file else None

    def required_scope(self, method: str) -> str | None:
        if method.startswith(OPEN_PREFIXES):
            return None
        if method == GENERATE_METHOD and not self.auth.require_generate:
            return None
        return METHOD_SCOPES.get(method, DEFAULT_SCOPE)

    def check(self, method: str, metadata: Any) -> Refusal | None:
        scope = self.required_scope(method)
        if scope is None:
            return None
        bearer = _bearer(metadata)
        if bearer is not None:
            entry = self.tokens.lookup(bearer) if self.tokens is not None else None
            if entry is None:
                return Refusal(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
            who, scopes = f"token {entry.name!r}", entry.scopes
        elif self.mutual:  # the handshake verified the client's certificate
            who, scopes = "client certificate", frozenset(self.auth.mtls_scopes)
        else:
            return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           "missing credentials: send 'authorization: Bearer <token>'")
        if scope not in scopes:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{who} lacks scope {scope!r} for {method}")
        return None


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _denying(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that aborts with `refusal` without decoding."""
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(refusal.code, refusal.details)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
        await context.abort(refusal.code, refusal.details)
        yield  # pragma: no cover - an async generator that never yields

    def keep(data: bytes) -> bytes:
        return data

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, request_deserializer=keep,
            response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            deny, request_deserializer=keep, response_serializer=handler.response_serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            deny_stream, request_deserializer=keep,
            response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        deny, request_deserializer=keep, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, guard: Guard,
                 on_refusal: Callable[[grpc.StatusCode], None] | None = None) -> None:
        self.guard = guard
        self.on_refusal = on_refusal

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        refusal = self.guard.check(method, handler_call_details.invocation_metadata)
        if handler is None or refusal is None:
            return handler
        log.info("%s refused: %s: %s", method, refusal.code.name, refusal.details)
        if self.on_refusal is not None:
            self.on_refusal(refusal.code)
        return _denying(handler, refusal)
