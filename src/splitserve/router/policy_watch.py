"""A router's live knobs: the `router` key of splitserve-policy over its config file.

Life cycle: the watch delivers the key's current value, then every change
(`PolicyStore.watch_forever`: restarted after a broker outage with a fresh snapshot).
Each value is merged over the file's `weights:` and `qos:` (`effective_router_policy`)
and, if valid, handed to `apply` (the pool's cost weights, the forwarder's QoS);
an invalid one is logged and counted, and the policy in force stays. A delete
brings the file's values back. Revisions no newer than the last one seen change
nothing (a snapshot repeats the last value).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from splitserve.config.router import RouterPolicy
from splitserve.errors import ConfigError
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.errors import TRANSIENT_BROKER_ERRORS
from splitserve.queue.policy import PolicyEntry, PolicyStore
from splitserve.queue.settings import BucketSettings
from splitserve.routing.policy import ROUTER_POLICY_KEY, effective_router_policy

log = logging.getLogger(__name__)


class RouterPolicyWatch:
    def __init__(self, file_policy: RouterPolicy,
                 apply: Callable[[RouterPolicy], None]) -> None:
        self.file_policy = file_policy
        self.apply = apply
        self.revision = 0  # the revision in force (0: the file alone)
        self.error = ""  # why the newest value was refused
        self._last_revision = 0

    def on_entry(self, entry: PolicyEntry) -> None:
        if entry.revision <= self._last_revision:
            return
        self._last_revision = entry.revision
        try:
            policy = effective_router_policy(self.file_policy, entry.value)
        except ConfigError as exc:
            self.error = f"revision {entry.revision} refused: {exc}"
            log.warning("router policy %s; %s stays in force", self.error,
                        f"revision {self.revision}" if self.revision else "the config file")
            return
        self.error = ""
        self.revision = entry.revision if entry.value is not None else 0
        self.apply(policy)
        log.info("router policy %s", f"revision {entry.revision} in force: "
                 f"{entry.value.decode(errors='replace')}" if entry.value is not None
                 else "deleted: the config file's weights and qos are in force")

    async def run(self, broker: BrokerConnection, settings: BucketSettings) -> None:
        store: PolicyStore | None = None
        while store is None:
            try:
                store = await PolicyStore.open(broker.js, settings)
            except TRANSIENT_BROKER_ERRORS:
                await asyncio.sleep(1.0)
        async for entry in store.watch_forever(broker, ROUTER_POLICY_KEY):
            if entry is not None:
                self.on_entry(entry)
