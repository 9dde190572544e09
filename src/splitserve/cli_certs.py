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


@certs_cmd.command("nats-auth")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--decode", "decode_ids", multiple=True, metavar="WORKER_ID",
              help="A decode worker's id (`worker_id` in its config); repeatable.")
@click.option("--prefill", "prefill_ids", multiple=True, metavar="WORKER_ID",
              help="A prefill worker's id; repeatable.")
@click.option("--router", "router_ids", multiple=True, metavar="NAME",
              help="A router's broker user (e.g. router); repeatable.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the broker's blocks [default: DIR/nats-auth.conf].")
@click.option("--bcrypt/--plain", "hashed", default=True, show_default=True,
              help="Write bcrypt hashes of the passwords, not the passwords.")
def certs_nats_auth(directory: Path, decode_ids: tuple[str, ...], prefill_ids: tuple[str, ...],
                    router_ids: tuple[str, ...], out: Path | None, hashed: bool) -> None:
    """The broker's `tls` and `authorization` blocks for `include ./nats-auth.conf`: one
    user per worker (plus admin and planner) with least privilege; passwords in
    DIR/<name>.nats-password (kept when present). Run `certs init DIR` first."""
    from splitserve.certs import broker_auth, write_private

    if not (directory / "server.pem").exists():
        raise click.ClickException(f"{directory}/server.pem missing: run `splitserve certs "
                                   f"init {directory}` first")
    workers = ([(i, "decode") for i in decode_ids] + [(i, "prefill") for i in prefill_ids]
               + [(i, "router") for i in router_ids])
    try:
        auth = broker_auth(directory, workers, hashed)  # type: ignore[arg-type]
        target = out or directory / "nats-auth.conf"
        write_private(target, auth.config_text.encode(), replace=True)
    except (SplitserveError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{target}: {len(auth.password_files)} broker users (0600; the broker's "
               "group needs read: chgrp splitserve-nats, chmod 0640)")
    for name, path in auth.password_files.items():
        click.echo(f"  {name}: nats_auth: {{user: {name}, password_file: {path}, "
                   f"ca_file: {directory / 'ca.pem'}}}")
