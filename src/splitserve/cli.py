"""`splitserve` command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from splitserve.calibrate import DEFAULT_LENGTHS
from splitserve.cli_options import (
    _CONNECT_TIMEOUT,
    _GRACE,
    _JSON,
    _TARGET,
    broker_options,
    call_options,
)
from splitserve.errors import SplitserveError
from splitserve.policy_admin import (
    POLICY_KEYS,
    BrokerTarget,
    PolicyValue,
    delete_policy,
    get_policy,
    set_policy,
)

if TYPE_CHECKING:
    from splitserve.client import CallOptions

T = TypeVar("T")


@click.group()
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """splitserve: disaggregated LLM inference (prefill and decode on separate workers)."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-tokens", default=128, show_default=True, type=int)
@click.option("--temperature", default=0.7, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int, help="Same seed, same output.")
@click.option("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
@click.option("--target", default=None, metavar="HOST:PORT",
              help="Stream from a running decode worker over gRPC instead of loading a model.")
@call_options
def generate(prompt: str, chat: bool, max_tokens: int, temperature: float, top_p: float,
             top_k: int, seed: int | None, model: str | None, dtype: str, target: str | None,
             call: CallOptions) -> None:
    """Generate text and stream it to stdout (in this process, or on --target)."""
    if target is not None:
        if model is not None:
            raise click.UsageError("--model applies only without --target")
        _generate_remote(target, call, text=prompt, chat=chat, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        return
    from splitserve.config.schema import EngineConfig
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams

    try:
        engine = Engine.from_config(EngineConfig(model=model, dtype=dtype))  # type: ignore[arg-type]
        if engine.tokenizer is None:
            raise click.ClickException("this model has no tokenizer")
        text = prompt
        if chat:
            text = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed)
        for out in engine.stream("cli", engine.tokenizer.encode(text), params):
            click.echo(out.text_delta, nl=False)
            sys.stdout.flush()
        click.echo()
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def model() -> None:
    """Model inspection."""


@model.command("info")
@click.option("--model", "source", default=None, help="GGUF file or HF directory.")
@click.option("--page-size", default=16, show_default=True, type=int)
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]))
def model_info(source: str | None, page_size: int, dtype: str) -> None:
    """Architecture, parameter count, KV bytes per token and per page."""
    from splitserve.engine.kv_pool import PageGeometry, dtype_from_name
    from splitserve.model.loader import load_model

    try:
        loaded = load_model(source, dtype_from_name(dtype))
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc
    c = loaded.config
    geo = PageGeometry(page_size, c.num_layers, c.num_kv_heads, c.head_dim, dtype_from_name(dtype))
    rows = [
        ("source", loaded.source),
        ("fingerprint", loaded.fingerprint),
        ("architecture", "llama"),
        ("layers", c.num_layers),
        ("hidden size", c.hidden_size),
        ("intermediate size", c.intermediate_size),
        ("attention heads", f"{c.num_heads} (KV heads {c.num_kv_heads}, head dim {c.head_dim})"),
        ("vocab size", c.vocab_size),
        ("context length", c.max_position_embeddings),
        ("rope", f"theta {c.rope_theta:g}, scaling {c.rope_scaling.kind}"),
        ("tied embeddings", c.tie_word_embeddings),
        ("parameters", f"{c.num_params:,} ({c.num_params / 1e6:.1f}M)"),
        ("KV dtype", dtype),
        ("KV bytes per token", f"{geo.bytes_per_token:,}"),
        (f"KV bytes per page ({page_size} tokens)", f"{geo.bytes_per_page:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _generate_remote(target: str, call: CallOptions, **fields: Any) -> None:
    from splitserve import client

    async def stream() -> None:
        request = client.generate_request(**fields)
        async for chunk in client.stream_generate(
                target, request, connect_timeout_s=call.connect_timeout_s,
                security=call.security):
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo()

    _run_remote(stream())


def _run_remote(call: Coroutine[Any, Any, T]) -> T:
    """Run one client call; a failure exits 1 with `Error: CODE: message` on stderr."""
    try:
        return asyncio.run(call)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc




@main.group()
def admin() -> None:
    """Operate a running daemon through its gRPC Admin service."""


@admin.command("status")
@_TARGET
@_JSON
@call_options
def admin_status(target: str, as_json: bool, call: CallOptions) -> None:
    """State, KV pages, queue and counters of one daemon."""
    from splitserve import client

    resp = _run_remote(client.admin_status(target, call))
    click.echo(client.to_json(resp) if as_json
               else client.format_table(client.status_rows(resp)))


@admin.command("workers")
@_TARGET
@_JSON
@call_options
def admin_workers(target: str, as_json: bool, call: CallOptions) -> None:
    """Workers the daemon knows of (itself, or the cluster registry)."""
    from splitserve import client

    resp = _run_remote(client.admin_workers(target, call))
    click.echo(client.to_json(resp) if as_json
               else client.format_table(client.worker_rows(resp)))


@admin.command("drain")
@_TARGET
@_GRACE
@_JSON
@call_options
def admin_drain(target: str, grace_s: float, as_json: bool, call: CallOptions) -> None:
    """Stop admitting requests and wait for in-flight ones."""
    from splitserve import client

    resp = _run_remote(client.admin_drain(target, grace_s, call))
    click.echo(client.to_json(resp) if as_json else
               f"state {client.state_name(resp.state)}, {resp.num_in_flight} requests in flight")


@admin.command("set-role")
@_TARGET
@click.option("--role", required=True, type=click.Choice(["prefill", "decode"]),
              help="The role to serve from now on.")
@_GRACE
@_JSON
@call_options
def admin_set_role(target: str, role: str, grace_s: float, as_json: bool,
                   call: CallOptions) -> None:
    """Switch a worker between prefill and decode in place (drain, switch, resume);
    exit 1 if the grace ran out and the old role stayed."""
    from splitserve import client

    resp = _run_remote(client.admin_set_role(target, role, grace_s, call))
    click.echo(client.to_json(resp) if as_json else client.set_role_line(resp))
    if resp.role != role:
        sys.exit(1)


@admin.command("resume")
@_TARGET
@_JSON
@call_options
def admin_resume(target: str, as_json: bool, call: CallOptions) -> None:
    """Admit requests again after a drain."""
    from splitserve import client

    resp = _run_remote(client.admin_resume(target, call))
    click.echo(client.to_json(resp) if as_json else f"state {client.state_name(resp.state)}")


@admin.command("reload")
@_TARGET
@_JSON
@call_options
def admin_reload(target: str, as_json: bool, call: CallOptions) -> None:
    """Re-read the daemon's config file now (as SIGHUP does); exit 1 if it was refused."""
    from splitserve import client

    resp = _run_remote(client.admin_reload(target, call))
    click.echo(client.to_json(resp) if as_json
               else client.format_table(client.reload_rows(resp)))
    if resp.error:
        sys.exit(1)


@admin.command("config")
@_TARGET
@call_options
def admin_config(target: str, call: CallOptions) -> None:
    """Print the config in force (after reloads) as YAML."""
    from splitserve import client

    resp = _run_remote(client.admin_config(target, call))
    click.echo(resp.config_yaml, nl=False)


@admin.group("policy")
def admin_policy() -> None:
    """The live routing policy in the splitserve-policy bucket (straight to the broker).

    Decode workers apply a write to their next requests, its fields over their config
    file's `routing:` section (see README, "Live policy")."""


_POLICY_KEY = click.option("--key", default="routing", show_default=True,
                           type=click.Choice(sorted(POLICY_KEYS)), help="The policy key.")
_REVISION = click.option("--revision", "expected_revision", default=None,
                         type=click.IntRange(min=0), help="Write only if the key is at this "
                         "revision (0: it must not exist); default: the revision just read.")


def _echo_policy(value: PolicyValue, as_json: bool) -> None:
    from splitserve import client

    click.echo(value.to_json() if as_json else client.format_table(value.rows()))


@admin_policy.command("get")
@broker_options
@_POLICY_KEY
@_JSON
@_CONNECT_TIMEOUT
def policy_get(broker: BrokerTarget, key: str, as_json: bool, connect_timeout: float) -> None:
    """Print the key's value and revision (0: not set, the config file is in force)."""
    _echo_policy(_run_remote(get_policy(broker, key, connect_timeout)), as_json)


@admin_policy.command("set")
@broker_options
@_POLICY_KEY
@_REVISION
@_JSON
@_CONNECT_TIMEOUT
@click.argument("assignments", nargs=-1, required=True, metavar="FIELD=VALUE... | JSON")
def policy_set(broker: BrokerTarget, key: str, expected_revision: int | None, as_json: bool,
               connect_timeout: float, assignments: tuple[str, ...]) -> None:
    """Set fields (FIELD=VALUE, FIELD=null drops one) or the whole value (one JSON
    object), validated first, with compare-and-set on the revision; prints the new one."""
    _echo_policy(_run_remote(set_policy(broker, key, assignments, expected_revision,
                                        connect_timeout)), as_json)


@admin_policy.command("delete")
@broker_options
@_POLICY_KEY
@_REVISION
@_CONNECT_TIMEOUT
def policy_delete(broker: BrokerTarget, key: str, expected_revision: int | None,
                  connect_timeout: float) -> None:
    """Delete the key (compare-and-set): the config file alone is in force again."""
    old = _run_remote(delete_policy(broker, key, expected_revision, connect_timeout))
    click.echo(f"{key}: revision {old.revision} deleted" if old.value is not None
               else f"{key}: not set")


def _lengths(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command()
@_TARGET
@broker_options
@click.option("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), show_default=True,
              callback=_lengths, help="Prompt lengths to measure, in tokens (comma-separated).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
              help="Requests per length and path.")
@click.option("--load", default=0, show_default=True, type=click.IntRange(min=0),
              help="Decode streams kept running on the target meanwhile (prefill under load).")
@click.option("--plot", "plot_path", default="calibration.png", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Where to write the PNG.")
@click.option("--dry-run", is_flag=True, help="Print the break-even; leave the policy as it was.")
@click.option("--seed", default=None, type=int,
              help="Seed of the random prompts (default: fresh ones every run; the same "
              "seed twice on one worker hits its prefix cache).")
@_JSON
@call_options
def calibrate(target: str, broker: BrokerTarget, lengths: tuple[int, ...], repeats: int, load: int,
              plot_path: Path, dry_run: bool, seed: int | None, as_json: bool,
              call: CallOptions) -> None:
    """Measure local vs remote prefill time by prompt length on a decode worker, find the
    break-even, plot both curves and write it as prefill_length_threshold to the live
    policy (splitserve-policy `routing`). Forces every decode worker all-local, then
    all-remote, for the few seconds each round takes."""
    from splitserve import client
    from splitserve.calibrate import CalibrationPlan
    from splitserve.calibrate import calibrate as run_calibration
    from splitserve.calibrate_report import plot, rows, summary, to_json

    try:
        plan = CalibrationPlan(target, broker, lengths, repeats, load, seed, dry_run, call)
    except SplitserveError as exc:
        raise click.UsageError(str(exc)) from None
    result = _run_remote(run_calibration(plan))
    plot(result, plot_path, f"prefill break-even on {target}")
    if as_json:
        click.echo(to_json(result, plot_path))
        return
    click.echo(client.format_table(rows(result)))
    for line in (*summary(result), f"plot: {plot_path}"):
        click.echo(line)


from splitserve.cli_certs import certs_cmd
from splitserve.cli_daemons import decode_cmd, planner_cmd, prefill_cmd, router_cmd, up_cmd
from splitserve.cli_simulate import profile_cmd, simulate_cmd

for _command in (decode_cmd, prefill_cmd, router_cmd, planner_cmd, up_cmd, certs_cmd,
                 simulate_cmd, profile_cmd):
    main.add_command(_command)

if __name__ == "__main__":
    main()
