"""`PolicyView`: the routing a decode worker applies now, live from `splitserve-policy`.

The merge and its precedence are `routing.policy` (the bucket's named fields over the
config file's `routing:` section). This module keeps the bucket side current:
1. at start, read key `routing` once, so the first request already follows it;
2. then watch it: every accepted write applies to the next offload decision (the watch
   delivers within milliseconds of the write);
3. a value that does not validate is refused: the policy in force stays, a warning is
   logged and `error` (GetStatus.policy_error) says why, until a valid write or a delete;
4. a delete reverts to the file alone (revision 0);
5. after a broker restart the watch starts again at once; its snapshot reports the key
   deleted too, so a delete the view did not see (while disconnected, or between the
   read at start and the watch) still reverts to the file.
The file base is read from the config source at every use, never cached, so a config
reload changes the base while the bucket's fields stay on top.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from splitserve.errors import ConfigError
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import TRANSIENT_BROKER_ERRORS
from splitserve.queue.kv_watch import KVEvent
from splitserve.queue.policy import PolicyStore
from splitserve.queue.settings import BucketSettings
from splitserve.routing.offload import RoutingConfig
from splitserve.routing.policy import ROUTING_POLICY_KEY, effective_routing
from splitserve.tasks import logged_task, stop_tasks

log = logging.getLogger(__name__)

READ_AT_START_S = 10.0  # a 3-node JetStream cluster elects its stream leaders in seconds


class PolicyView:
    """The effective `RoutingConfig` (`routing`), the bucket revision in force
    (`revision`, 0: the file alone) and why the last bucket value was refused (`error`).

    `file_routing` returns the config file's routing in force (after reloads); it is
    called at every use. Runs on the event loop; not thread-safe.
    """

    def __init__(self, file_routing: Callable[[], RoutingConfig]) -> None:
        self._file_routing = file_routing
        self._override: bytes | None = None  # the accepted bucket value
        self.revision = 0
        self.error = ""
        self._last_revision = 0  # the newest bucket revision seen (accepted or not)
        self._base = file_routing()
        self._effective = self._base
        self._task: asyncio.Task[None] | None = None

    @property
    def routing(self) -> RoutingConfig:
        """The file's routing with the accepted bucket fields on top."""
        base = self._file_routing()
        if base is not self._base:  # the file was reloaded: merge the override again
            self._base = base
            try:
                self._effective = effective_routing(base, self._override)
            except ConfigError as exc:  # per-field checks: cannot happen today; keep the last
                self._refuse(self.revision, exc)
        return self._effective

    def apply(self, event: KVEvent) -> None:
        """One bucket event for the routing key (value None: deleted). Events no newer
        than the newest revision seen change nothing (a snapshot repeats the last one)."""
        if event.revision <= self._last_revision:
            return
        self._last_revision = event.revision
        base = self._file_routing()
        try:
            effective = effective_routing(base, event.value)
        except ConfigError as exc:
            self._refuse(event.revision, exc)
            return
        replaced, self.error = self._override, ""
        self._base, self._effective, self._override = base, effective, event.value
        if event.value is not None:
            self.revision = event.revision
            log.info("routing policy revision %d in force: %s", event.revision,
                     event.value.decode(errors="replace"))
        elif replaced is not None:
            log.info("routing policy revision %d deleted from the bucket: the config file's "
                     "routing is in force", self.revision)
            self.revision = 0

    def _refuse(self, revision: int, exc: ConfigError) -> None:
        self.error = f"revision {revision} refused: {exc}"
        log.warning("routing policy %s; %s stays in force", self.error,
                    f"revision {self.revision}" if self.revision else "the config file")

    # --- the watch ----------------------------------------------------------------------
    async def start(self, broker: BrokerConnection, settings: BucketSettings) -> None:
        """Read the key once, then follow it in a background task. A broker that does
        not answer (a JetStream cluster still electing its leaders) is retried for
        READ_AT_START_S; after that the file's routing applies until the watch, which
        keeps retrying, delivers the key: a slow broker never stops a worker starting."""
        deadline = time.monotonic() + READ_AT_START_S
        store: PolicyStore | None = None
        while True:
            try:
                store = store or await PolicyStore.open(broker.js, settings)
                entry = await store.get(ROUTING_POLICY_KEY)
                break
            except TRANSIENT_BROKER_ERRORS as exc:
                if time.monotonic() >= deadline:
                    log.warning("routing policy: reading key %r at start failed (%s: %s); "
                                "the config file's routing applies until the watch "
                                "delivers it", ROUTING_POLICY_KEY, type(exc).__name__, exc)
                    entry = None
                    break
                await asyncio.sleep(0.5)
        if entry is not None:
            self.apply(entry)
        self._task = logged_task(self._follow(store, broker, settings), "routing policy watch")

    async def stop(self) -> None:
        await stop_tasks(self._task)

    async def _follow(self, store: PolicyStore | None, broker: BrokerConnection,
                      settings: BucketSettings) -> None:
        while store is None:  # the broker did not answer at start
            try:
                store = await PolicyStore.open(broker.js, settings)
            except TRANSIENT_BROKER_ERRORS:
                await asyncio.sleep(1.0)
        async for event in store.watch_forever(broker, ROUTING_POLICY_KEY):
            if event is not None:  # None: restarted, a fresh snapshot follows
                self.apply(event)
