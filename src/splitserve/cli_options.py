"""Options shared by the `splitserve` commands that call a daemon."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from splitserve.errors import SplitserveError

_TARGET = click.option("--target", required=True, metavar="HOST:PORT",
                       help="gRPC address of the daemon.")
_JSON = click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
_CONNECT_TIMEOUT = click.option("--connect-timeout", default=5.0, show_default=True, type=float,
                                help="Seconds to wait for the daemon to accept the connection.")
_FILE = click.Path(exists=True, dir_okay=False)
_GRACE = click.option("--grace", "--grace-s", "grace_s", default=30.0, show_default=True,
                      type=float, help="Seconds to wait for in-flight requests (0: return "
                      "at once).")


def call_options(command: Callable[..., None]) -> Callable[..., None]:
    """--connect-timeout, --token-file and --tls-* for a command that calls a daemon:
    the command gets them as `call` (client.CallOptions)."""
    @_CONNECT_TIMEOUT
    @click.option("--token-file", default=None, type=_FILE,
                  help="A file whose first line is a bearer token (auth.tokens_file's).")
    @click.option("--tls-ca", default=None, type=_FILE,
                  help="Verify the daemon's TLS certificate against this CA (PEM).")
    @click.option("--tls-cert", default=None, type=_FILE, help="mTLS: our certificate (PEM).")
    @click.option("--tls-key", default=None, type=_FILE, help="mTLS: our private key (PEM).")
    @functools.wraps(command)
    def wrapper(*args: Any, connect_timeout: float, token_file: str | None,
                tls_ca: str | None, tls_cert: str | None, tls_key: str | None,
                **kwargs: Any) -> None:
        from splitserve.client import CallOptions, ClientSecurity

        try:
            security = ClientSecurity.from_files(tls_ca or "", tls_cert or "", tls_key or "",
                                                 token_file or "")
        except SplitserveError as exc:
            raise click.UsageError(str(exc)) from None
        command(*args, call=CallOptions(security, connect_timeout), **kwargs)

    return wrapper


def broker_options(command: Callable[..., None]) -> Callable[..., None]:
    """--nats-url and the broker login (--nats-user, --nats-password-file, --nats-ca) for
    a command that talks to NATS: the command gets them as `broker` (BrokerTarget)."""
    from splitserve.policy_admin import DEFAULT_NATS_URL

    @click.option("--nats-url", default=DEFAULT_NATS_URL, show_default=True,
                  help="The broker, as the workers' nats_url.")
    @click.option("--nats-user", default="", help="Broker user (`splitserve up`: admin).")
    @click.option("--nats-password-file", default=None, type=_FILE,
                  help="A file whose first line is that user's password.")
    @click.option("--nats-ca", default=None, type=_FILE,
                  help="The broker runs TLS: verify it against this CA (PEM).")
    @functools.wraps(command)
    def wrapper(*args: Any, nats_url: str, nats_user: str, nats_password_file: str | None,
                nats_ca: str | None, **kwargs: Any) -> None:
        from splitserve.config.security import NatsAuthConfig
        from splitserve.policy_admin import BrokerTarget

        try:
            auth = NatsAuthConfig(nats_user, nats_password_file or "", nats_ca or "")
        except SplitserveError as exc:
            raise click.UsageError(str(exc)) from None
        command(*args, broker=BrokerTarget(nats_url, auth), **kwargs)

    return wrapper
