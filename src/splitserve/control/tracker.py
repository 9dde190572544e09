"""Counts the Generate calls a server has open, so a drain knows when it is done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class RequestTracker:
    """In-flight Generate calls and rejection count of one server (event-loop thread only)."""

    def __init__(self) -> None:
        self.num_in_flight = 0
        self.num_rejects = 0  # RESOURCE_EXHAUSTED answers
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one call for the duration of the `with` block."""
        self.num_in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.num_in_flight -= 1
            if self.num_in_flight == 0:
                self._idle.set()

    def record_reject(self) -> None:
        self.num_rejects += 1

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight; False if `timeout_s` ran out first."""
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
