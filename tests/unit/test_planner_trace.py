"""Trace loading and scaling (planner/trace.py): exact arrivals, errors naming lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitserve.planner.trace import (
    TraceError,
    TraceScaling,
    day_envelope,
    load_trace,
    scale_trace,
)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_generic_csv_in_seconds_is_sorted_from_the_first_arrival(tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                        "12.5,100,7\n10.0,20,3\n\n11,5,1\n"))
    assert trace.t_s.tolist() == [0.0, 1.0, 2.5]
    assert trace.prompt_tokens.tolist() == [20, 5, 100]
    assert trace.output_tokens.tolist() == [3, 1, 7]
    assert trace.span_s == 2.5


def test_azure_timestamps(tmp_path: Path) -> None:
    trace = load_trace(_write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                        "2023-11-16 18:15:46.6805900,374,44\n"
                                        "2023-11-16 18:15:50.9951690,396,109\n"))
    assert trace.t_s[1] == pytest.approx(4.314579, abs=1e-6)
    assert len(trace) == 2


@pytest.mark.parametrize(("text", "line", "words"), [
    ("TIMESTAMP,ContextTokens\n1,2\n", 1, "missing column"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,x,3\n", 3, "ContextTokens 'x'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\nyesterday,2,3\n", 3, "TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,-3\n", 2, "negative"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n1,2\n", 2, "2 column(s)"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", 2, "no arrivals"),
    ("", 1, "empty file"),
])
def test_bad_files_name_the_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TraceError, match=f"trace.csv:{line}: .*{words[:8]}") as info:
        load_trace(path)
    assert info.value.line == line
    assert words in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.csv")


def _trace(tmp_path: Path) -> Path:
    rows = "".join(f"{t},{p},{o}\n" for t, p, o in
                   [(0, 1020, 129), (1, 3, 4), (2, 17, 9), (3, 800, 1)])
    return _write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)


def test_length_and_time_scale(tmp_path: Path) -> None:
    scaled = scale_trace(load_trace(_trace(tmp_path)), TraceScaling(length_scale=8,
                                                                    time_scale=2.0))
    assert scaled.t_s.tolist() == [0.0, 2.0, 4.0, 6.0]
    # 1020/8 = 127.5 rounds to even 128; 3/8 rounds to 0, kept at 1 token
    assert scaled.prompt_tokens.tolist() == [128, 1, 2, 100]
    assert scaled.output_tokens.tolist() == [16, 1, 1, 1]
    assert "lengths / 8" in scaled.description and "time x 2" in scaled.description


def test_copies_overlay_with_seeded_offsets(tmp_path: Path) -> None:
    base = load_trace(_trace(tmp_path))
    scaled = scale_trace(base, TraceScaling(copies=3, seed=7))
    again = scale_trace(base, TraceScaling(copies=3, seed=7))
    assert len(scaled) == 12
    assert np.array_equal(scaled.t_s, again.t_s)
    assert np.all(np.diff(scaled.t_s) >= 0)
    assert set(base.t_s.tolist()) <= set(scaled.t_s.tolist())  # copy 0 is not shifted
    assert scaled.t_s.max() < 4.0  # the period: span 3 s + one mean gap
    assert sorted(scaled.prompt_tokens.tolist()) == sorted(base.prompt_tokens.tolist() * 3)


def test_duration_cuts_and_loops(tmp_path: Path) -> None:
    base = load_trace(_trace(tmp_path))
    assert len(scale_trace(base, TraceScaling(duration_s=2.5))) == 3
    looped = scale_trace(base, TraceScaling(duration_s=12.0))
    assert len(looped) == 12 and looped.t_s.max() < 12.0
    half = scale_trace(base, TraceScaling(copies=4, rate_scale=2.0, duration_s=400.0))
    assert 0 < len(half) < 4 * 4 * 100


def test_envelope_thins_by_time(tmp_path: Path) -> None:
    rows = "".join(f"{i * 0.01},{10},{10}\n" for i in range(20000))
    base = load_trace(_write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows))
    shaped = scale_trace(base, TraceScaling(), day_envelope(200.0, 0.2), "day")
    night = np.sum(shaped.t_s < 20)
    peak = np.sum((shaped.t_s >= 90) & (shaped.t_s < 110))
    assert night < 0.5 * peak
    assert "envelope day" in shaped.description


def test_bad_scaling() -> None:
    with pytest.raises(ValueError, match="length_scale"):
        TraceScaling(length_scale=0)
    with pytest.raises(ValueError, match="rate_scale"):
        TraceScaling(copies=2, rate_scale=3.0)
