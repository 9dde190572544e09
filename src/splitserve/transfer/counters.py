"""Transfer counters: bytes, transfers, descriptors, failures and latency."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_RESERVOIR_SIZE = 1024


@dataclass
class LatencyStats:
    """Running total and count, plus a uniform reservoir sample for percentiles.

    A reservoir of 1024 samples bounds memory while keeping p99 within about one
    percentile point of the true value on a stationary workload.
    """

    total_s: float = 0.0
    count: int = 0
    samples: list[float] = field(default_factory=list)
    _num_seen: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def record(self, seconds: float, weight: int = 1) -> None:
        """Add one sample; `weight` counts it as that many events in the mean."""
        self.total_s += seconds * weight
        self.count += weight
        self._num_seen += 1
        if len(self.samples) < _RESERVOIR_SIZE:
            self.samples.append(seconds)
            return
        slot = self._rng.randrange(self._num_seen)
        if slot < _RESERVOIR_SIZE:
            self.samples[slot] = seconds

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0

    def percentile_s(self, q: float) -> float:
        """The q-th percentile (0..100) of the sampled values, 0.0 when empty."""
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
        return ordered[index]


@dataclass
class TransferCounters:
    """What a `TransferAgent` has moved since it started.

    `descriptor_latency` records each transfer's duration divided by its number of
    descriptors, weighted by that number, so its mean is seconds per descriptor.
    """

    num_bytes: int = 0
    num_transfers: int = 0
    num_descriptors: int = 0
    num_failures: int = 0
    num_notifications: int = 0
    transfer_latency: LatencyStats = field(default_factory=LatencyStats)
    descriptor_latency: LatencyStats = field(default_factory=LatencyStats)

    def record_transfer(self, num_bytes: int, num_descriptors: int, seconds: float) -> None:
        self.num_bytes += num_bytes
        self.num_transfers += 1
        self.num_descriptors += num_descriptors
        self.transfer_latency.record(seconds)
        self.descriptor_latency.record(seconds / num_descriptors, weight=num_descriptors)

    def snapshot(self) -> dict[str, float]:
        """Flat numbers for stats messages and logs."""
        return {
            "num_bytes": self.num_bytes,
            "num_transfers": self.num_transfers,
            "num_descriptors": self.num_descriptors,
            "num_failures": self.num_failures,
            "num_notifications": self.num_notifications,
            "transfer_mean_s": self.transfer_latency.mean_s,
            "transfer_p50_s": self.transfer_latency.percentile_s(50),
            "transfer_p99_s": self.transfer_latency.percentile_s(99),
            "descriptor_mean_s": self.descriptor_latency.mean_s,
        }
