"""Bounds on a peer's clock offset from the timestamps of one job's round trip.

A decode worker publishes a `PrefillJob` at t0 (its clock, `publish_time_unix_ns`);
the prefill worker dequeues it at t1 and finishes prefill at t2 (its clock, in
`KVReady.dequeue_time_unix_ns` / `prefill_end_unix_ns`); the decode worker sees
`KVReady` at t3 (its clock). With θ = peer clock − our clock and one-way delays
d1, d2 ≥ 0 (queueing included):

    t1 − t0 = θ + d1   and   t3 − t2 = −θ + d2,   so   t2 − t3 ≤ θ ≤ t1 − t0.

Every sample's interval contains the true offset, so the intersection over several
samples does too and is tighter (NTP's bound, without its delay symmetry guess).
`ClockOffsets.is_excluded` says when a peer's clock is *provably* further off than
the lease skew margin, which the fence invariant relies on (ARCHITECTURE.md).

Clock jumps: while the offset holds still, the samples of a window always agree
(their intervals share θ). A new sample disjoint from the window's intersection is
therefore proof that the offset changed; the window restarts from that sample, so
bounds never cross and a jumped clock is judged on its new offset at once. Without a
jump the window keeps the last `window_size` samples (32 by default: at a few jobs per
second, a few seconds of history, as wide as the shortest d1 plus the shortest d2
among them).

Pure: no I/O and no clock of its own; all times come from the messages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_WINDOW_SIZE = 32
_NS_PER_S = 1e9


@dataclass(frozen=True)
class OffsetBounds:
    """θ = peer clock − our clock lies in [min_s, max_s] (seconds), from `num_samples`
    samples; the last one arrived at `last_sample_unix_ns` (our clock, t3)."""

    min_s: float
    max_s: float
    num_samples: int
    last_sample_unix_ns: int

    def is_off_by_more_than(self, margin_s: float) -> bool:
        """True when every offset the samples allow is beyond ±margin_s."""
        return self.min_s > margin_s or self.max_s < -margin_s


@dataclass
class _PeerWindow:
    """Per-sample bounds (ns) of one peer's last samples, oldest first."""

    samples: deque[tuple[int, int]]
    last_sample_unix_ns: int = 0
    num_jumps: int = 0

    def intersection(self) -> tuple[int, int]:
        return max(lo for lo, _ in self.samples), min(hi for _, hi in self.samples)


class ClockOffsets:
    """Offset bounds per peer id, over a sliding window of each peer's last
    `window_size` samples."""

    def __init__(self, window_size: int = DEFAULT_WINDOW_SIZE) -> None:
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1 sample, got {window_size}")
        self.window_size = window_size
        self._peers: dict[str, _PeerWindow] = {}

    def observe(self, peer_id: str, t0_ns: int, t1_ns: int, t2_ns: int, t3_ns: int) -> bool:
        """Add one round trip: publish (t0, ours), dequeue (t1, peer's), prefill end
        (t2, peer's), KVReady seen (t3, ours), unix ns.

        Returns False, changing nothing, for a sample that carries no information: a
        missing timestamp (0, e.g. from a peer that does not stamp it) or one that
        contradicts itself (t2 − t3 > t1 − t0: a clock moved during the round trip).
        """
        if min(t0_ns, t1_ns, t2_ns, t3_ns) <= 0:
            return False
        lo_ns, hi_ns = t2_ns - t3_ns, t1_ns - t0_ns
        if lo_ns > hi_ns:
            return False
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _PeerWindow(deque(maxlen=self.window_size))
        elif peer.samples:
            window_lo, window_hi = peer.intersection()
            if lo_ns > window_hi or hi_ns < window_lo:
                peer.samples.clear()  # the offset changed: older samples describe the past
                peer.num_jumps += 1
        peer.samples.append((lo_ns, hi_ns))
        peer.last_sample_unix_ns = t3_ns
        return True

    def bounds(self, peer_id: str) -> OffsetBounds | None:
        """The tightest bounds the window allows, or None before the first sample."""
        peer = self._peers.get(peer_id)
        if peer is None or not peer.samples:
            return None
        lo_ns, hi_ns = peer.intersection()
        return OffsetBounds(lo_ns / _NS_PER_S, hi_ns / _NS_PER_S, len(peer.samples),
                            peer.last_sample_unix_ns)

    def is_excluded(self, peer_id: str, margin_s: float) -> bool:
        """True when the peer's clock is provably off by more than `margin_s` either way.

        A peer without samples is not excluded: no evidence, no verdict.
        """
        if margin_s < 0:
            raise ValueError(f"margin_s must be >= 0, got {margin_s}")
        bounds = self.bounds(peer_id)
        return bounds is not None and bounds.is_off_by_more_than(margin_s)

    def forget(self, peer_id: str) -> None:
        """Drop a peer's samples (it left, or restarted under a new incarnation)."""
        self._peers.pop(peer_id, None)

    def prune(self, before_unix_ns: int) -> list[str]:
        """Forget peers whose last sample arrived before `before_unix_ns`; returns their ids.

        Worker ids of restarted workers differ, so a long-lived decode worker calls
        this now and then to keep the table to the peers it still hears from.
        """
        stale = sorted(p for p, w in self._peers.items() if w.last_sample_unix_ns < before_unix_ns)
        for peer_id in stale:
            del self._peers[peer_id]
        return stale

    @property
    def peer_ids(self) -> list[str]:
        return sorted(self._peers)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Flat numbers per peer id, for status and logs."""
        report: dict[str, dict[str, float]] = {}
        for peer_id in self.peer_ids:
            bounds = self.bounds(peer_id)
            if bounds is None:
                continue
            report[peer_id] = {
                "offset_min_s": bounds.min_s,
                "offset_max_s": bounds.max_s,
                "num_samples": bounds.num_samples,
                "last_sample_unix_ns": bounds.last_sample_unix_ns,
                "num_jumps": self._peers[peer_id].num_jumps,
            }
        return report
