"""Peer clock-offset bounds from job round trips (routing/clock.py), in milliseconds."""

from __future__ import annotations

import pytest

from splitserve.routing.clock import ClockOffsets, OffsetBounds

MS = 1_000_000  # ns
BASE = 1_700_000_000_000 * MS  # a realistic unix time in ns, so 0 stays "missing"


def _sample(
    offsets: ClockOffsets, peer_id: str, *, theta_ms: int, d1_ms: int, prefill_ms: int,
    d2_ms: int, at_ms: int = 0,
) -> bool:
    """One round trip with true offset θ = theta_ms (peer − ours) starting at our
    BASE + at_ms; returns what `observe` returned."""
    t0 = BASE + at_ms * MS
    t1 = t0 + (theta_ms + d1_ms) * MS
    t2 = t1 + prefill_ms * MS
    t3 = t2 + (d2_ms - theta_ms) * MS
    return offsets.observe(peer_id, t0, t1, t2, t3)


def _bounds_ms(offsets: ClockOffsets, peer_id: str) -> tuple[float, float, int]:
    bounds = offsets.bounds(peer_id)
    assert bounds is not None
    return bounds.min_s * 1000, bounds.max_s * 1000, bounds.num_samples


def test_one_sample_gives_the_ntp_interval() -> None:
    offsets = ClockOffsets()
    # t0=0, t1=13, t2=63, t3=68 (ms): θ ∈ [t2 − t3, t1 − t0] = [−5, 13]
    assert offsets.observe("p", BASE, BASE + 13 * MS, BASE + 63 * MS, BASE + 68 * MS)
    assert offsets.bounds("p") == OffsetBounds(-0.005, 0.013, 1, BASE + 68 * MS)
    assert offsets.bounds("other") is None


def test_intersection_of_samples_is_exact() -> None:
    offsets = ClockOffsets()
    # θ = 100 ms; intervals [θ − d2, θ + d1]
    _sample(offsets, "p", theta_ms=100, d1_ms=30, prefill_ms=50, d2_ms=4)  # [96, 130]
    assert _bounds_ms(offsets, "p") == (96.0, 130.0, 1)
    _sample(offsets, "p", theta_ms=100, d1_ms=2, prefill_ms=10, d2_ms=40, at_ms=500)  # [60, 102]
    assert _bounds_ms(offsets, "p") == (96.0, 102.0, 2)
    _sample(offsets, "p", theta_ms=100, d1_ms=9, prefill_ms=1, d2_ms=9, at_ms=900)  # [91, 109]
    assert _bounds_ms(offsets, "p") == (96.0, 102.0, 3)
    bounds = offsets.bounds("p")
    assert bounds is not None and bounds.min_s <= 0.100 <= bounds.max_s


def test_peers_are_kept_apart() -> None:
    offsets = ClockOffsets()
    _sample(offsets, "a", theta_ms=-40, d1_ms=1, prefill_ms=5, d2_ms=2)
    _sample(offsets, "b", theta_ms=25, d1_ms=3, prefill_ms=5, d2_ms=1)
    assert _bounds_ms(offsets, "a") == (-42.0, -39.0, 1)
    assert _bounds_ms(offsets, "b") == (24.0, 28.0, 1)
    assert offsets.peer_ids == ["a", "b"]


@pytest.mark.parametrize(
    ("theta_ms", "margin_ms", "excluded"),
    [
        (600, 500, True),  # peer ahead: min 598 > 500
        (-600, 500, True),  # peer behind: max −598 < −500
        (501, 500, False),  # min 499: within the margin is still possible
        (-501, 500, False),
        (0, 500, False),
        (3, 0, True),  # a zero margin excludes any provable offset
    ],
)
def test_exclusion_in_both_directions(theta_ms: int, margin_ms: int, excluded: bool) -> None:
    offsets = ClockOffsets()
    _sample(offsets, "p", theta_ms=theta_ms, d1_ms=2, prefill_ms=20, d2_ms=2)
    assert offsets.is_excluded("p", margin_ms / 1000) is excluded


def test_loose_bounds_do_not_exclude_until_tight() -> None:
    offsets = ClockOffsets()
    # θ = 700 ms but the job waited 900 ms in the queue: [698, 1600] excludes at 500 ms,
    # while a slow KVReady path leaves the lower bound inside the margin: [−200, ...].
    _sample(offsets, "p", theta_ms=700, d1_ms=900, prefill_ms=20, d2_ms=900)
    assert _bounds_ms(offsets, "p") == (-200.0, 1600.0, 1)
    assert not offsets.is_excluded("p", 0.5)
    _sample(offsets, "p", theta_ms=700, d1_ms=900, prefill_ms=20, d2_ms=3, at_ms=2000)
    assert _bounds_ms(offsets, "p") == (697.0, 1600.0, 2)
    assert offsets.is_excluded("p", 0.5)


def test_unknown_peer_is_not_excluded_and_margin_is_checked() -> None:
    offsets = ClockOffsets()
    assert not offsets.is_excluded("nobody", 0.5)
    with pytest.raises(ValueError, match="margin_s"):
        offsets.is_excluded("nobody", -0.1)


def test_window_forgets_old_samples() -> None:
    offsets = ClockOffsets(window_size=4)
    _sample(offsets, "p", theta_ms=0, d1_ms=1, prefill_ms=5, d2_ms=1)  # [−1, 1]
    for i in range(3):
        _sample(offsets, "p", theta_ms=0, d1_ms=50, prefill_ms=5, d2_ms=60, at_ms=100 * (i + 1))
    assert _bounds_ms(offsets, "p") == (-1.0, 1.0, 4)
    # the fifth sample pushes the tight one out of the window
    _sample(offsets, "p", theta_ms=0, d1_ms=50, prefill_ms=5, d2_ms=60, at_ms=400)
    assert _bounds_ms(offsets, "p") == (-60.0, 50.0, 4)


@pytest.mark.parametrize("jump_ms", [10_000, -10_000])
def test_clock_jump_restarts_the_window(jump_ms: int) -> None:
    offsets = ClockOffsets(window_size=8)
    for i in range(8):
        _sample(offsets, "p", theta_ms=0, d1_ms=2, prefill_ms=5, d2_ms=3, at_ms=100 * i)
    assert _bounds_ms(offsets, "p") == (-3.0, 2.0, 8)
    assert not offsets.is_excluded("p", 0.5)

    # The peer's clock jumps: the first sample after it disagrees with the whole window,
    # so bounds never cross and the new offset counts at once.
    _sample(offsets, "p", theta_ms=jump_ms, d1_ms=2, prefill_ms=5, d2_ms=3, at_ms=1000)
    assert _bounds_ms(offsets, "p") == (jump_ms - 3.0, jump_ms + 2.0, 1)
    assert offsets.is_excluded("p", 0.5)
    assert offsets.snapshot()["p"]["num_jumps"] == 1

    # and back: the peer recovers on its first sample with a sane clock
    _sample(offsets, "p", theta_ms=0, d1_ms=4, prefill_ms=5, d2_ms=6, at_ms=2000)
    assert _bounds_ms(offsets, "p") == (-6.0, 4.0, 1)
    assert not offsets.is_excluded("p", 0.5)
    assert offsets.snapshot()["p"]["num_jumps"] == 2


def test_small_jump_inside_the_bounds_keeps_the_window() -> None:
    offsets = ClockOffsets()
    _sample(offsets, "p", theta_ms=0, d1_ms=10, prefill_ms=5, d2_ms=10)  # [−10, 10]
    _sample(offsets, "p", theta_ms=6, d1_ms=10, prefill_ms=5, d2_ms=10, at_ms=100)  # [−4, 16]
    assert _bounds_ms(offsets, "p") == (-4.0, 10.0, 2)
    assert offsets.snapshot()["p"]["num_jumps"] == 0


@pytest.mark.parametrize("missing", [0, 1, 2, 3])
def test_missing_timestamps_are_ignored(missing: int) -> None:
    offsets = ClockOffsets()
    stamps = [BASE, BASE + 5 * MS, BASE + 9 * MS, BASE + 12 * MS]
    stamps[missing] = 0
    assert not offsets.observe("p", *stamps)
    assert offsets.bounds("p") is None
    _sample(offsets, "p", theta_ms=0, d1_ms=5, prefill_ms=4, d2_ms=3)
    stamps = [BASE, BASE + 5 * MS, BASE + 9 * MS, BASE + 12 * MS]
    stamps[missing] = 0
    assert not offsets.observe("p", *stamps)
    assert _bounds_ms(offsets, "p") == (-3.0, 5.0, 1)


def test_self_contradicting_sample_is_ignored() -> None:
    offsets = ClockOffsets()
    # the peer's prefill (t2 − t1 = 50 ms) lasted longer than our whole round trip
    # (t3 − t0 = 20 ms): a clock moved mid-sample, the interval [30, 0] is empty
    assert not offsets.observe("p", BASE, BASE, BASE + 50 * MS, BASE + 20 * MS)
    assert offsets.bounds("p") is None


def test_snapshot_prune_and_forget() -> None:
    offsets = ClockOffsets()
    _sample(offsets, "old", theta_ms=1, d1_ms=1, prefill_ms=1, d2_ms=1, at_ms=0)
    _sample(offsets, "new", theta_ms=-2, d1_ms=1, prefill_ms=1, d2_ms=1, at_ms=5000)
    assert offsets.snapshot() == {
        "new": {"offset_min_s": -0.003, "offset_max_s": -0.001, "num_samples": 1,
                "last_sample_unix_ns": BASE + 5003 * MS, "num_jumps": 0},
        "old": {"offset_min_s": 0.0, "offset_max_s": 0.002, "num_samples": 1,
                "last_sample_unix_ns": BASE + 3 * MS, "num_jumps": 0},
    }
    assert offsets.prune(before_unix_ns=BASE + 1000 * MS) == ["old"]
    assert offsets.peer_ids == ["new"]
    offsets.forget("new")
    offsets.forget("never-seen")
    assert offsets.snapshot() == {}


def test_window_size_is_checked() -> None:
    with pytest.raises(ValueError, match="window_size"):
        ClockOffsets(window_size=0)
