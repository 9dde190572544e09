"""The simulator with the planner against static pools on a step change of load, and
`splitserve simulate` end to end through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner

from splitserve.cli import main
from splitserve.config.planner import PlannerConfig, ScalingConfig
from splitserve.planner.profile import Profile, dump_json
from splitserve.planner.sim import SimSettings, simulate, summarize
from splitserve.planner.trace import Trace

PROFILE = Profile(prefill_ms_per_token=1.0, decode_base_ms=10.0, decode_ms_per_seq=1.0,
                  startup_prefill_s=5.0, startup_decode_s=5.0)
CONFIG = PlannerConfig(interval_s=5.0, scaling=ScalingConfig(
    target_decode_tokens_per_s=200.0, ttft_slo_ms=2000.0, tpot_slo_ms=100.0, max_step=4,
    scale_up_cooldown_s=10.0, scale_down_cooldown_s=60.0))


def _step_trace() -> Trace:
    """2 req/s for 120 s, then 20 req/s for 240 s; 150-token prompts, 40-token outputs."""
    t = np.concatenate([np.arange(0.0, 120.0, 0.5), np.arange(120.0, 360.0, 0.05)])
    n = t.shape[0]
    return Trace(t, np.full(n, 150, dtype=np.int64), np.full(n, 40, dtype=np.int64))


def test_planner_adds_instances_where_static_pools_drown() -> None:
    trace = _step_trace()
    static = summarize(simulate(trace, SimSettings(CONFIG, PROFILE, static=(1, 1))),
                       CONFIG.scaling)
    result = simulate(trace, SimSettings(CONFIG, PROFILE, initial=(1, 1)))
    planner = summarize(result, CONFIG.scaling)
    before = [p for p in result.timeline if p.t_s <= 120.0]
    after = [p for p in result.timeline if p.t_s >= 300.0]
    assert max(p.num_prefill + p.num_decode for p in before) <= 3
    assert min(p.num_prefill + p.num_decode for p in after) >= 4  # it scaled up
    assert planner["num_lost"] == static["num_lost"] == 0
    assert planner["slo_attainment"] > static["slo_attainment"] + 0.2
    assert planner["instance_seconds"]["total"] > static["instance_seconds"]["total"]


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"{i * 0.25},{80 + 8 * (i % 5)},{16 + i % 7}\n" for i in range(200)))
    planner = tmp_path / "planner.yaml"
    planner.write_text(yaml.safe_dump({"interval_s": 5, "scaling": {"ttft_slo_ms": 3000}}))
    profile = tmp_path / "profile.json"
    profile.write_text(dump_json(PROFILE))
    return trace, planner, profile


def test_cli_json_and_plot(tmp_path: Path) -> None:
    trace, planner, profile = _files(tmp_path)
    png = tmp_path / "out" / "sim.png"
    result = CliRunner().invoke(main, [
        "simulate", "--trace", str(trace), "--planner", str(planner), "--profile",
        str(profile), "--length-scale", "2", "--copies", "2", "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["num_requests"] == 400 and out["num_lost"] == 0
    assert out["slo"] == {"ttft_ms": 3000.0, "tpot_ms": 200.0}
    assert "lengths / 2" in out["trace"] and out["mode"] == "planner"
    assert out["timeline"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_static_table_and_errors(tmp_path: Path) -> None:
    trace, planner, profile = _files(tmp_path)
    base = ["simulate", "--trace", str(trace), "--planner", str(planner), "--profile",
            str(profile)]
    ok = CliRunner().invoke(main, [*base, "--static", "1:2"])
    assert ok.exit_code == 0, ok.output
    assert "static 1:2" in ok.output and "attain" in ok.output
    bad = CliRunner().invoke(main, [*base, "--static", "2"])
    assert bad.exit_code == 2 and "expected P:D" in bad.output
    both = CliRunner().invoke(main, [*base, "--static", "1:1", "--role-flips"])
    assert both.exit_code == 2 and "planner only" in both.output
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,two,3\n")
    broken = CliRunner().invoke(main, [*base, "--static", "1:1"])
    assert broken.exit_code == 1 and "trace.csv:3" in broken.output
