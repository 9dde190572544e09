"""A chaos row: its workers, its workload's progress, when the fault struck, and the
probes fault scripts wait on (jobs in flight on a prefill worker, jobs queued)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from chaos_client import Progress
from chaos_cluster import Cluster, CounterLedger, Daemon, get_status, num_queued_jobs

from splitserve.config.daemon import LeaseConfig

GATE = 0.7  # the share of a row's requests sent before its fault is over


@dataclass
class Row:
    """One fault's run: its workers, what the workload has done, what happened when."""

    name: str
    cluster: Cluster
    decode: Daemon
    prefills: list[Daemon]
    num_requests: int
    gate_index: int  # requests from here on wait until the fault is over (GATE)
    progress: Progress
    ledger: CounterLedger
    t0: float = field(default_factory=time.monotonic)
    fault_s: float | None = None  # when the fault struck
    fault_end_s: float | None = None  # when the fault was over (the gate opened)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    notes: list[str] = field(default_factory=list)
    evidence: dict[str, object] = field(default_factory=dict)

    def note(self, message: str) -> None:
        self.notes.append(f"{time.monotonic() - self.t0:.1f}s {message}")

    def strike(self, message: str) -> None:
        if self.fault_s is None:
            self.fault_s = time.monotonic()
        self.note(message)

    def fault_over(self) -> None:
        """Let the held-back requests go (at the latest when the script returns)."""
        if not self.gate.is_set():
            self.fault_end_s = time.monotonic()
            self.gate.set()

    @property
    def daemons(self) -> list[Daemon]:
        return [self.decode, *self.prefills]

    async def warm_up(self, fraction: float = 0.15) -> None:
        """Until a share of the workload is done, so the fault meets a busy cluster."""
        num = min(self.gate_index, max(1, int(fraction * self.num_requests)))
        await self.progress.wait_done(num, 120.0)

    async def until(self, probe: Callable[[], Awaitable[bool]], timeout_s: float,
                    what: str) -> bool:
        """Poll `probe` until it holds, the timeout, or the end of the requests sent
        before the fault (nothing more can happen until the fault is over)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.progress.num_done < self.gate_index:
            if await probe():
                return True
            await asyncio.sleep(0.1)
        self.note(f"gave up waiting for {what}")
        return False

    async def in_flight(self, daemon: Daemon) -> int:
        status = await get_status(daemon.address, timeout_s=1.0)
        return 0 if status is None else int(status.num_in_flight)


@dataclass(frozen=True)
class Fault:
    name: str
    script: Callable[[Row], Awaitable[None]]
    decode: str = "decode-0"
    prefills: tuple[str, ...] = ("prefill-0",)
    nats_nodes: int = 1
    duplicate_every: int = 0  # a duplicate send of every n-th request


async def jobs_in_flight(row: Row, prefill: Daemon, min_jobs: int = 1,
                          timeout_s: float = 20.0) -> int:
    """Wait until `prefill` works on `min_jobs` jobs; how many it had."""
    seen = 0

    async def probe() -> bool:
        nonlocal seen
        seen = await row.in_flight(prefill)
        return seen >= min_jobs

    await row.until(probe, timeout_s, f"{min_jobs} jobs in flight on {prefill.worker_id}")
    return seen


async def jobs_queued(row: Row, min_jobs: int, timeout_s: float = 20.0) -> int:
    seen = 0

    async def probe() -> bool:
        nonlocal seen
        try:
            seen = await num_queued_jobs(row.cluster.nats_url)
        except Exception:  # noqa: BLE001 - the broker may be restarting; ask again
            return False
        return seen >= min_jobs

    await row.until(probe, timeout_s, f"{min_jobs} queued jobs")
    return seen


def max_lease_s(lease: LeaseConfig, num_tokens: int = 400) -> float:
    return lease.base_s + lease.per_token_ms * num_tokens / 1e3 + lease.skew_margin_s
