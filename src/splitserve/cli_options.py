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
