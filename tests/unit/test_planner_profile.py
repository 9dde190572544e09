"""The simulator's cost model (planner/profile.py): exact costs, loading, calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitserve.errors import ConfigError
from splitserve.planner.profile import (
    DEFAULT_PROFILE,
    Profile,
    dump_json,
    from_calibration,
    load_profile,
)


def test_piecewise_prefill() -> None:
    p = Profile(prefill_tokens=(10.0, 20.0, 40.0), prefill_ms_points=(5.0, 15.0, 25.0))
    assert p.prefill_ms(0) == 0.0
    assert p.prefill_ms(5) == 2.5  # through the origin below the first point
    assert p.prefill_ms(10) == 5.0
    assert p.prefill_ms(15) == 10.0
    assert p.prefill_ms(30) == 20.0
    assert p.prefill_ms(60) == 35.0  # the last segment's slope beyond
    assert p.chunk_ms(10, 10) == 10.0


def test_formula_decode_transfer() -> None:
    p = Profile(prefill_base_ms=2.0, prefill_ms_per_token=0.5, prefill_ms_per_token_sq=0.01,
                decode_base_ms=10.0, decode_ms_per_seq=2.0, decode_ms_per_context_token=0.001,
                kv_bytes_per_token=1000, transfer_bytes_per_s=1e6)
    assert p.prefill_ms(10) == pytest.approx(2.0 + 5.0 + 1.0)
    assert p.decode_step_ms(4, 500.0) == pytest.approx(10.0 + 8.0 + 2.0)
    assert p.transfer_ms(100) == pytest.approx(100.0)


def test_yaml_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    original = Profile(name="x", prefill_tokens=(16.0, 32.0), prefill_ms_points=(3.0, 5.0))
    path.write_text(dump_json(original))
    assert load_profile(path) == original
    path.write_text("prefill_tokens: [16, 32]\nprefill_ms_points: [1]\n")
    with pytest.raises(ConfigError, match="prefill_ms_points"):
        load_profile(path)
    path.write_text("decode_base_ms: -1\n")
    with pytest.raises(ConfigError, match="decode_base_ms"):
        load_profile(path)
    path.write_text("decode_step: 3\n")
    with pytest.raises(ConfigError, match="decode_step: unknown setting"):
        load_profile(path)


def test_from_calibration(tmp_path: Path) -> None:
    calibration = {
        "break_even_tokens": 200, "extrapolated": False, "measured_tokens": [32, 512],
        "local": {"intercept_ms": 10.0, "slope_ms_per_token": 2.0,
                  "medians": [{"tokens": 512, "ttft_ms": 1034.0},
                              {"tokens": 32, "ttft_ms": 74.0}]},
        "remote": {"intercept_ms": 60.0, "slope_ms_per_token": 2.5, "medians": []},
    }
    base = Profile(kv_bytes_per_token=1000, decode_base_ms=33.0)
    p = from_calibration(calibration, base)
    assert p.prefill_tokens == (32.0, 512.0) and p.prefill_ms_points == (74.0, 1034.0)
    assert p.remote_overhead_ms == 50.0
    assert p.transfer_bytes_per_s == pytest.approx(2e6)  # 0.5 ms per 1000-byte token
    assert p.decode_base_ms == 33.0
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(calibration))
    assert load_profile(path).remote_overhead_ms == 50.0
    with pytest.raises(ConfigError, match="calibrate --json"):
        from_calibration({"local": {}}, base)


def test_shipped_profile_loads() -> None:
    p = load_profile(None)
    assert DEFAULT_PROFILE.exists()
    assert p.prefill_ms(256) > p.prefill_ms(64) > 0
    assert p.decode_step_ms(64, 200.0) > p.decode_step_ms(1, 200.0) > 0


def test_a_mixed_step_charges_one_forward_pass_fixed_cost() -> None:
    from splitserve.planner.profile import Profile

    profile = Profile(prefill_tokens=(16.0, 32.0, 64.0), prefill_ms_points=(100.0, 120.0, 160.0),
                      decode_base_ms=60.0)
    assert profile.prefill_intercept_ms() == 80.0  # the line through 16 -> 100, 32 -> 120
    assert profile.shared_step_ms(0, 8) == 0.0  # decodes alone: nothing double-counted
    assert profile.shared_step_ms(1, 0) == 0.0  # one new prompt alone
    assert profile.shared_step_ms(1, 8) == 60.0  # both: the smaller fixed cost once
    assert profile.shared_step_ms(2, 8) == 140.0  # two new prompts and decodes: 80 + 60
