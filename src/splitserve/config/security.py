"""Typed configs of a daemon's gRPC security: TLS (optionally mutual) and tokens.

```yaml
grpc_tls:                      # all empty: plaintext
  cert_file: /etc/splitserve/certs/server.pem
  key_file: /etc/splitserve/certs/server.key
  client_ca_file: /etc/splitserve/certs/ca.pem   # set: clients must show a cert it signed
auth:
  tokens_file: /etc/splitserve/tokens            # set: Admin needs a token (or an mTLS cert)
  require_generate: false                        # true: Generation needs a "generate" token
```

The tokens file holds one token per line, `NAME SCOPES TOKEN` (scopes comma-separated,
`#` starts a comment); see control/auth.py. Files are named here, never secrets: a
config can be printed, logged and returned by Admin/GetConfig as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitserve.errors import ConfigError

SCOPES = ("admin:read", "admin:write", "generate")


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS; `client_ca_file` makes it mutual (a client certificate is required)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("grpc_tls", "cert_file and key_file go together")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("grpc_tls.client_ca_file", "needs cert_file and key_file (mTLS "
                              "is TLS with client certificates)")


@dataclass(frozen=True)
class AuthConfig:
    """Who may call what.

    - tokens_file: bearer tokens with scopes; set, Admin calls need `admin:read`
      (GetStatus, ListWorkers, GetConfig) or `admin:write` (Drain, Resume, Reload).
    - require_generate: Generation calls need a token with scope `generate` (an API key).
    - mtls_scopes: what a client with a verified certificate may do without a token
      (with `grpc_tls.client_ca_file`).
    Health and reflection stay open, so probes and `grpcurl list` keep working.
    """

    tokens_file: str = ""
    require_generate: bool = False
    mtls_scopes: tuple[str, ...] = ("admin:read", "admin:write")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.mtls_scopes) - set(SCOPES))
        if unknown:
            raise ConfigError("auth.mtls_scopes", f"unknown scope {unknown[0]!r} "
                              f"(known: {', '.join(SCOPES)})")
        if self.require_generate and not self.tokens_file:
            raise ConfigError("auth.require_generate", "needs auth.tokens_file (where the "
                              "API keys are)")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file)


@dataclass(frozen=True)
class NatsAuthConfig:
    """How a daemon proves itself to the broker (the URL carries no secret).

    - user / password_file: a user of the broker's `authorization` block, its password
      read from the file (first line);
    - ca_file: the broker runs TLS; verify its certificate against this CA.
    All empty: no credentials, plaintext (a broker on loopback, as in the tests).
    """

    user: str = ""
    password_file: str = ""
    ca_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.user) != bool(self.password_file):
            raise ConfigError("nats_auth", "user and password_file go together")

    def password(self) -> str:
        """The password; ConfigError naming the file when it cannot be read."""
        try:
            text = Path(self.password_file).read_text()
        except OSError as exc:
            raise ConfigError(self.password_file, f"cannot read: {exc.strerror}") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise ConfigError(self.password_file, "no password in the file")
        return lines[0]
