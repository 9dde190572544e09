"""The break-even of remote prefill from measured samples (planner/calibration.py): exact
fits and crossings on constructed lines, medians against outliers, every case of the
two lines' relative position, and the report drawn from a calibration."""

from __future__ import annotations

import json

import pytest

from splitserve.calibrate import Calibration, CalibrationError, CalibrationPlan
from splitserve.calibrate_report import plot, rows, summary, to_json
from splitserve.planner.calibration import (
    MAX_THRESHOLD,
    Line,
    PrefillPath,
    Sample,
    break_even,
    crossing,
    fit_line,
    medians,
)
from splitserve.policy_admin import BrokerTarget

LOCAL, REMOTE = PrefillPath.LOCAL, PrefillPath.REMOTE
LENGTHS = (32, 64, 128, 256, 512)


def samples_of(path: PrefillPath, intercept_ms: float, slope: float,
               lengths: tuple[int, ...] = LENGTHS) -> list[Sample]:
    return [Sample(path, n, intercept_ms + slope * n) for n in lengths]


def line(intercept_ms: float, slope: float) -> Line:
    return Line(intercept_ms, slope, ())


def test_a_line_through_collinear_points_is_exact() -> None:
    fit = fit_line(medians(samples_of(LOCAL, 3.0, 1.5), LOCAL))
    assert fit.intercept_ms == pytest.approx(3.0, abs=1e-9)
    assert fit.slope_ms_per_token == pytest.approx(1.5, abs=1e-12)
    assert fit.points == tuple((n, 3.0 + 1.5 * n) for n in LENGTHS)


def test_medians_ignore_one_slow_request_per_length() -> None:
    samples = [*samples_of(LOCAL, 0.0, 1.0), *samples_of(LOCAL, 0.0, 1.0),
               Sample(LOCAL, 64, 10_000.0), Sample(REMOTE, 64, 1.0)]
    assert medians(samples, LOCAL) == tuple((n, float(n)) for n in LENGTHS)
    assert medians(samples, REMOTE) == ((64, 1.0),)


def test_one_length_is_not_a_line() -> None:
    with pytest.raises(ValueError, match="two lengths"):
        fit_line(((64, 10.0),))
    with pytest.raises(ValueError, match="two lengths"):
        break_even([*samples_of(LOCAL, 0, 1), Sample(REMOTE, 64, 5.0), Sample(REMOTE, 64, 6.0)])


@pytest.mark.parametrize("local,remote,expected", [
    ((0.0, 1.0), (100.0, 0.5), 200),      # remote costs 100 ms more, saves 0.5 ms/token
    ((0.0, 1.0), (100.5, 0.5), 201),      # rounded up: remote is faster only from 201
    ((0.0, 1.0), (100.0, 1.0), None),     # parallel, remote above: never
    ((100.0, 1.0), (0.0, 1.0), 0),        # parallel, remote below: always
    ((0.0, 1.0), (50.0, 2.0), None),      # remote dearer per token and at zero: never
    ((50.0, 1.0), (0.0, 2.0), 0),         # remote below at zero, the lines part: 0
    ((10.0, 1.0), (10.0, 0.5), 0),        # equal at zero, remote cheaper per token
    ((0.0, 1e-9), (1e9, 0.0), MAX_THRESHOLD),  # far beyond any context: the policy bound
])
def test_crossing(local: tuple[float, float], remote: tuple[float, float],
                  expected: int | None) -> None:
    assert crossing(line(*local), line(*remote)) == expected


def test_break_even_of_measured_lines_and_extrapolation() -> None:
    inside = break_even([*samples_of(LOCAL, 5.0, 1.0), *samples_of(REMOTE, 105.0, 0.5)])
    assert (inside.length, inside.measured, inside.extrapolated) == (200, (32, 512), False)
    assert "break-even at 200 effective prompt tokens" in inside.describe()
    beyond = break_even([*samples_of(LOCAL, 0.0, 1.0), *samples_of(REMOTE, 700.0, 0.5)])
    assert (beyond.length, beyond.extrapolated) == (1400, True)
    assert "extrapolated beyond the measured 32-512 tokens" in beyond.describe()
    never = break_even([*samples_of(LOCAL, 0.0, 1.0), *samples_of(REMOTE, 100.0, 1.0)])
    assert (never.length, never.extrapolated) == (None, False)
    assert "no break-even" in never.describe()


def test_plans_refuse_what_cannot_be_fitted() -> None:
    with pytest.raises(CalibrationError, match="two distinct positive lengths"):
        CalibrationPlan("127.0.0.1:1", BrokerTarget(), lengths=(64, 64))
    with pytest.raises(CalibrationError, match="two distinct positive lengths"):
        CalibrationPlan("127.0.0.1:1", BrokerTarget(), lengths=(0, 64))
    with pytest.raises(CalibrationError, match="repeats"):
        CalibrationPlan("127.0.0.1:1", BrokerTarget(), repeats=0)


def test_the_report_tables_jsons_and_plots_a_calibration(tmp_path) -> None:
    samples = (*samples_of(LOCAL, 5.0, 1.0), *samples_of(REMOTE, 105.0, 0.5, LENGTHS[1:]))
    calibration = Calibration(samples, 1, break_even(samples),
                              b'{"prefill_length_threshold":200}', 7, "wrote it")
    table = rows(calibration)
    assert table[0] == ("tokens", "local_ms", "remote_ms", "remote-local_ms")
    assert table[1] == ("32", "37.0", "-", "-")
    assert table[2] == ("64", "69.0", "137.0", "68.0")
    assert len(table) == 1 + len(LENGTHS)
    assert summary(calibration)[2] == "samples: 9 (1 discarded: another path or a second attempt)"
    report = json.loads(to_json(calibration, tmp_path / "p.png"))
    assert report["break_even_tokens"] == 200
    assert report["policy"] == {"value": {"prefill_length_threshold": 200}, "revision": 7,
                                "note": "wrote it"}
    assert report["remote"]["medians"][0] == {"tokens": 64, "ttft_ms": 137.0}
    plot(calibration, tmp_path / "out" / "p.png", "test")
    assert (tmp_path / "out" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def points(path: PrefillPath, *pairs: tuple[int, float]) -> list[Sample]:
    return [Sample(path, x, y) for x, y in pairs]


def test_the_break_even_is_where_remote_turns_faster_for_the_last_time() -> None:
    # Measured (the idle 2-core run's shape): remote slower, nearly equal, then faster;
    # the crossing lies between 1024 (40 ms slower) and 2048 (160 ms faster).
    local = points(LOCAL, (32, 158), (256, 638), (512, 1542), (1024, 3167), (2048, 7411))
    remote = points(REMOTE, (32, 280), (256, 630), (512, 1713), (1024, 3207), (2048, 7251))
    result = break_even([*local, *remote])
    assert result.length == 1229  # 1024 + 1024 * 40 / 200, rounded up
    assert (result.measured, result.extrapolated) == ((32, 2048), False)


def test_beyond_the_measured_lengths_the_lines_decide() -> None:
    # remote faster at every measured length (from 32); the lines cross at 20
    below = break_even([*samples_of(LOCAL, 0.0, 2.0), *samples_of(REMOTE, 20.0, 1.0)])
    assert (below.length, below.extrapolated) == (20, True)
    # remote slower at the largest length; the lines cross beyond it
    above = break_even([*samples_of(LOCAL, 0.0, 1.0), *samples_of(REMOTE, 700.0, 0.5)])
    assert (above.length, above.extrapolated) == (1400, True)
    # remote slower at the largest length and the lines crossed already below it: never
    noisy = points(LOCAL, (32, 100), (64, 200), (128, 400)) + points(
        REMOTE, (32, 90), (64, 150), (128, 401))
    assert break_even(noisy).length is None


def test_paths_measured_at_different_lengths_cannot_be_compared() -> None:
    with pytest.raises(ValueError, match="share 1 measured length"):
        break_even(points(LOCAL, (32, 1), (64, 2)) + points(REMOTE, (64, 1), (128, 2)))
