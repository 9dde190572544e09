"""One active planner: a lock in the `splitserve-policy` bucket (key `planner.lock`).

The value names the holder and when its hold ends (unix seconds). Every tick each
planner reads it and, with compare-and-set on the revision it read:
- no lock, or one whose hold ended: take it (create / update) — it leads;
- its own: renew it — it leads;
- another's, still held: stand by (compute nothing, write nothing, serve GetPlan).
Two planners racing for the same revision: the broker lets one write win, the other
gets PolicyConflict and stands by. A leader that stops cleanly deletes the lock so a
standby takes over at its next tick; one that dies is replaced once its hold ends
(`lock_ttl_s`, a few ticks). Holds are in unix time: planners whose clocks differ by
more than the TTL could both lead (run them on NTP-synced hosts, as the leases need).

`decide` is pure (tests/unit/test_planner_leader.py); `PlannerLock` does the I/O.
"""

from __future__ import annotations

import enum
import json
import logging
from dataclasses import dataclass

from splitserve.queue.errors import PolicyConflict
from splitserve.queue.policy import PolicyEntry, PolicyStore

log = logging.getLogger(__name__)

LOCK_KEY = "planner.lock"


class LockAction(enum.Enum):
    TAKE = "take"  # create it, or replace an expired or unreadable one
    RENEW = "renew"
    STANDBY = "standby"


@dataclass(frozen=True)
class Hold:
    holder: str
    until_unix_s: float

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "until_unix_s": self.until_unix_s},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> Hold | None:
        try:
            data = json.loads(value)
            return cls(str(data["holder"]), float(data["until_unix_s"]))
        except (ValueError, KeyError, TypeError):
            return None


def decide(current: Hold | None, me: str, now_unix_s: float) -> LockAction:
    if current is None or current.until_unix_s <= now_unix_s:
        return LockAction.TAKE
    return LockAction.RENEW if current.holder == me else LockAction.STANDBY


class PlannerLock:
    def __init__(self, store: PolicyStore, me: str, ttl_s: float) -> None:
        self.store = store
        self.me = me
        self.ttl_s = ttl_s
        self.holder = ""  # who leads, as last read
        self._revision = 0  # of our hold, when we lead

    @property
    def leading(self) -> bool:
        return self.holder == self.me

    async def tick(self, now_unix_s: float) -> bool:
        """Take, renew or stand by; True when this planner leads now. Broker errors
        propagate (the caller stands by until the broker answers)."""
        entry: PolicyEntry | None = await self.store.get(LOCK_KEY)
        current = Hold.decode(entry.value) if entry is not None and entry.value else None
        action = decide(current, self.me, now_unix_s)
        was = self.holder
        if action is LockAction.STANDBY:
            assert current is not None
            self.holder = current.holder
        else:
            hold = Hold(self.me, now_unix_s + self.ttl_s)
            try:
                self._revision = await self.store.put(
                    LOCK_KEY, hold.encode(),
                    expected_revision=entry.revision if entry is not None else 0)
                self.holder = self.me
            except PolicyConflict:
                self.holder = ""  # another planner won this round; read it next tick
        if self.holder != was:
            log.info("planner %s: %s (lock held by %s)", self.me,
                     "leading" if self.leading else "standby", self.holder or "nobody yet")
        return self.leading

    async def release(self) -> None:
        """Delete our hold so that a standby leads at its next tick."""
        if not self.leading:
            return
        try:
            await self.store.delete(LOCK_KEY, expected_revision=self._revision)
        except PolicyConflict:
            pass  # it expired and another planner took it meanwhile
        self.holder = ""
