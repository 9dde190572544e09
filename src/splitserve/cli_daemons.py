"""`splitserve decode|prefill|router|planner|up`: the daemon commands (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from splitserve.errors import SplitserveError

_CONFIG = click.option("--config", "config_path", required=True,
                       type=click.Path(exists=True, dir_okay=False, path_type=Path),
                       help="YAML config file.")


def _run_worker(config_path: Path, role: str) -> None:
    from splitserve.daemons.worker import run_worker

    try:
        run_worker(config_path, role)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("decode")
@_CONFIG
def decode_cmd(config_path: Path) -> None:
    """Run a decode worker: gRPC ingress, remote/local prefill, decode."""
    _run_worker(config_path, "decode")


@click.command("prefill")
@_CONFIG
def prefill_cmd(config_path: Path) -> None:
    """Run a prefill worker: pull jobs, prefill, write KV pages to decode workers."""
    _run_worker(config_path, "prefill")


@click.command("router")
@_CONFIG
def router_cmd(config_path: Path) -> None:
    """Run a router: OpenAI-compatible HTTP and gRPC in front of the decode workers."""
    from splitserve.daemons.router import run_router

    try:
        run_router(config_path)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("planner")
@_CONFIG
def planner_cmd(config_path: Path) -> None:
    """Run the planner: retune routing thresholds and scale the prefill/decode pools."""
    from splitserve.daemons.planner import run_planner

    try:
        run_planner(config_path)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("up")
@_CONFIG
def up_cmd(config_path: Path) -> None:
    """Start a local cluster (nats-server, prefill and decode workers) until Ctrl-C."""
    from splitserve.config.daemon import load_cluster_config
    from splitserve.config.watch import ChangeDetector
    from splitserve.daemons.up import run_up

    try:
        changes = ChangeDetector(config_path)  # before the load: no save is missed
        run_up(load_cluster_config(config_path), changes)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc
