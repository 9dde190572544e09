"""`splitserve simulate` (replay a trace through the planner/simulator) and `splitserve
profile` (measure the simulator's cost model on this machine); registered in cli.py,
the work is in planner/sim*.py and planner/measure.py."""

from __future__ import annotations

import json
from pathlib import Path

import click

from splitserve.errors import SplitserveError


@click.command("simulate")
@click.option("--trace", "trace_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV: TIMESTAMP,ContextTokens,GeneratedTokens (the Azure trace format).")
@click.option("--planner", "planner_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Planner config (its scaling, thresholds, routing and interval_s).")
@click.option("--static", "static", default=None, metavar="P:D",
              help="Fixed pools of P prefill and D decode instances, thresholds fixed.")
@click.option("--initial", default=None, metavar="P:D",
              help="Planner: the pools at time 0 (default: min_prefill (>= 1):min_decode).")
@click.option("--role-flips", is_flag=True,
              help="Planner: a fixed total (the initial pools) whose instances flip roles.")
@click.option("--profile", "profile_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Cost model (YAML/JSON, or `splitserve calibrate --json` output); "
              "default: configs/profile-smollm2-cpu.yaml.")
@click.option("--length-scale", default=1.0, show_default=True, type=float,
              help="Divide prompt and output lengths by this.")
@click.option("--time-scale", default=1.0, show_default=True, type=float,
              help="Stretch time by this (2: half the rate).")
@click.option("--copies", default=1, show_default=True, type=int,
              help="Overlay this many copies of the trace at random offsets.")
@click.option("--rate-scale", default=None, type=float,
              help="Thin the copies to this multiple of the trace's rate (<= copies).")
@click.option("--duration-s", default=None, type=float,
              help="Cut (or loop the trace up) to this many seconds.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=Path),
              help="Write a PNG: load, instances per role, TTFT p99 over time.")
def simulate_cmd(trace_path: Path, planner_path: Path, static: str | None,
                 initial: str | None, role_flips: bool, profile_path: Path | None,
                 length_scale: float, time_scale: float, copies: int,
                 rate_scale: float | None, duration_s: float | None, seed: int,
                 as_json: bool, plot_path: Path | None) -> None:
    """Replay a trace through a simulated cluster with the planner (or --static P:D)."""
    from splitserve.config.planner import load_planner_config
    from splitserve.planner import sim
    from splitserve.planner.profile import load_profile
    from splitserve.planner.trace import TraceScaling, load_trace, scale_trace

    try:
        static_pd = sim.parse_pd(static) if static is not None else None
        initial_pd = sim.parse_pd(initial) if initial is not None else None
        scaling = TraceScaling(length_scale, time_scale, copies, rate_scale, duration_s, seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if static_pd is not None and (initial_pd is not None or role_flips):
        raise click.UsageError("--static runs fixed pools: --initial and --role-flips "
                               "apply to the planner only")
    try:
        config = load_planner_config(planner_path)
        profile = load_profile(profile_path)
        trace = scale_trace(load_trace(trace_path), scaling)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc
    settings = sim.SimSettings(config, profile, static=static_pd, initial=initial_pd,
                               fixed_total=role_flips, seed=seed)
    result = sim.simulate(trace, settings)
    summary = sim.summarize(result, config.scaling)
    if plot_path is not None:
        sim.plot([result], plot_path, f"{trace.description}; {result.mode}")
    if as_json:
        click.echo(json.dumps({"trace": trace.description, "profile": profile.name,
                               **summary, "timeline": sim.timeline_json(result),
                               "plot": str(plot_path) if plot_path else None}, indent=2))
        return
    click.echo(f"trace: {trace.description}")
    click.echo(f"profile: {profile.name}")
    click.echo(sim.format_table(sim.table([summary])))
    if plot_path is not None:
        click.echo(f"plot: {plot_path}")


@click.command("profile")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the profile (YAML).")
@click.option("--threads", default=1, show_default=True, type=int,
              help="torch threads while measuring (1: a worker pinned to one core).")
@click.option("--repeats", default=3, show_default=True, type=int)
@click.option("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M).")
def profile_cmd(out_path: Path, threads: int, repeats: int, model: str | None) -> None:
    """Measure prefill and decode step times of the engine here; write a profile."""
    from splitserve.config.schema import EngineConfig
    from splitserve.planner.measure import (
        MeasureSettings,
        describe_machine,
        measure,
        write_profile,
    )

    if threads < 1 or repeats < 1:
        raise click.BadParameter("--threads and --repeats must be >= 1")
    settings = MeasureSettings(engine=EngineConfig(model=model), threads=threads,
                               repeats=repeats)
    try:
        profile, raw = measure(settings)
    except SplitserveError as exc:
        raise click.ClickException(str(exc)) from exc
    write_profile(profile, raw, out_path, settings, describe_machine())
    click.echo(f"{out_path}: {profile.name}; raw medians {raw}")
