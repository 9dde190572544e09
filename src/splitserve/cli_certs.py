"""`splitserve certs init DIR`: a private CA, server and client certificates, and a
tokens file (registered in cli.py; the work is in certs.py)."""

from __future__ import annotations

from pathlib import Path

import click

from splitserve.errors import SplitserveError


@click.group("certs")
def certs_cmd() -> None:
    """TLS certificates and tokens for a cluster."""


@certs_cmd.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", "hosts", multiple=True, metavar="NAME|IP",
              help="Another name or address the daemons are reached at (repeatable); "
              "localhost, 127.0.0.1, ::1 and this host's name are always in.")
@click.option("--tokens/--no-tokens", default=True, show_default=True,
              help="Also write DIR/tokens and DIR/<name>.token (admin, monitor, client).")
def certs_init(directory: Path, hosts: tuple[str, ...], tokens: bool) -> None:
    """Create a CA and the certificates (and tokens) missing in DIR; keep what exists."""
    from splitserve.certs import DEFAULT_GRANTS, init_certs, write_tokens

    try:
        issued = init_certs(directory, hosts)
        tokens_file = write_tokens(directory, DEFAULT_GRANTS) if tokens else None
    except (SplitserveError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    made = ", ".join(issued.created) or "nothing (all present)"
    click.echo(f"{directory}: created {made}")
    click.echo(f"  CA (give to clients): {issued.path('ca.pem')}")
    click.echo(f"  server cert/key:      {issued.path('server.pem')} {issued.path('server.key')}")
    if tokens_file is not None:
        click.echo(f"  tokens file:          {tokens_file}  (auth.tokens_file)")
        click.echo(f"  admin token file:     {directory / 'admin.token'}  (--token-file)")
