"""Least privilege on the broker: one NATS user per worker (and one each for the admin
and the planner), each allowed only the subjects its role needs.

What each identity may publish (everything else is refused by the server):
- every identity: the JetStream API (`$JS.API.>`: stream and KV lookups, consumers,
  direct gets) except deleting or purging streams and deleting messages, flow-control
  replies (`$JS.FC.>`) and replies to requests (`_INBOX.>`);
- a decode worker: prefill jobs (`splitserve.prefill.>`: only decode workers do),
  its own registry key (`$KV.splitserve-workers.<id>`), its own stats and its own
  prefix-cache events (`splitserve.kv.<id>`);
- a prefill worker: acks of the jobs it pulls (`$JS.ACK.>`), lease requests to decode
  workers (`splitserve.lease.*`), its own registry key and its own stats;
- the admin and the planner: the policy bucket (`$KV.splitserve-policy.>`); no other
  identity writes it;
- a router: nothing but the common subjects (it reads the registry and stats);
- a `worker` (a worker the planner may flip between prefill and decode in place,
  Admin/SetRole): what a decode and a prefill worker may, together. Give it only to
  workers on hosts trusted as decode workers: it may publish prefill jobs.
Subscriptions: every identity its inboxes (`_INBOX.>`: API replies, watches); a decode
worker also its lease subject and the prefill workers' stats; admin and planner all stats;
a router the decode workers' stats and prefix-cache events.

So a prefill worker (or a stolen prefill password) cannot inject a `PrefillJob`, no
worker can rewrite another's registry entry (and so redirect KV to a rogue agent), and
only the planner or an operator changes routing. `server_config` renders the server's
`tls` and `authorization` blocks (NATS config syntax accepts JSON values).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from splitserve.queue.subjects import (
    BUCKET_POLICY,
    BUCKET_WORKERS,
    KV_EVENTS_PREFIX,
    LEASE_PREFIX,
    STATS_PREFIX,
    validate_worker_id,
)

Role = Literal["decode", "prefill", "worker", "admin", "planner", "router"]
WORKER_ROLES = ("decode", "prefill", "worker")  # names are worker ids, checked as such

COMMON_PUBLISH = ("$JS.API.>", "$JS.FC.>", "_INBOX.>")
COMMON_DENY = ("$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>",
               "$JS.API.STREAM.MSG.DELETE.>")
COMMON_SUBSCRIBE = ("_INBOX.>",)


@dataclass(frozen=True)
class Identity:
    """A broker user: `name` is the worker id for workers, else the role."""

    name: str
    role: Role
    password: str

    def publish(self) -> list[str]:
        own = [f"$KV.{BUCKET_WORKERS}.{self.name}", f"{STATS_PREFIX}.{self.role}.{self.name}"]
        decode = ["splitserve.prefill.>", f"{KV_EVENTS_PREFIX}.{self.name}"]
        prefill = ["$JS.ACK.>", f"{LEASE_PREFIX}.*"]
        extra = {
            "decode": [*decode, *own],
            "prefill": [*prefill, *own],
            "worker": [*decode, *prefill, f"$KV.{BUCKET_WORKERS}.{self.name}",
                       f"{STATS_PREFIX}.decode.{self.name}",
                       f"{STATS_PREFIX}.prefill.{self.name}"],
            "admin": [f"$KV.{BUCKET_POLICY}.>"],
            "planner": [f"$KV.{BUCKET_POLICY}.>"],
            "router": [],
        }[self.role]
        return [*COMMON_PUBLISH, *extra]

    def subscribe(self) -> list[str]:
        extra = {
            "decode": [f"{LEASE_PREFIX}.{self.name}", f"{STATS_PREFIX}.prefill.*"],
            "prefill": [],
            "worker": [f"{LEASE_PREFIX}.{self.name}", f"{STATS_PREFIX}.prefill.*"],
            "admin": [f"{STATS_PREFIX}.>"],
            "planner": [f"{STATS_PREFIX}.>"],
            "router": [f"{STATS_PREFIX}.decode.*", f"{KV_EVENTS_PREFIX}.*"],
        }[self.role]
        return [*COMMON_SUBSCRIBE, *extra]

    def __post_init__(self) -> None:
        if self.role in (*WORKER_ROLES, "router"):
            validate_worker_id(self.name)


def server_config(identities: Sequence[Identity], cert_file: str = "", key_file: str = "",
                  ) -> str:
    """The `tls` (when a certificate is given) and `authorization` blocks."""
    users = [{"user": i.name, "password": i.password, "permissions": {
        "publish": {"allow": i.publish(), "deny": list(COMMON_DENY)},
        "subscribe": {"allow": i.subscribe()}}} for i in identities]
    blocks = []
    if cert_file:
        tls = {"cert_file": cert_file, "key_file": key_file, "timeout": 5}
        blocks.append(f"tls {json.dumps(tls, indent=2)}")
    blocks.append(f"authorization {json.dumps({'users': users}, indent=2)}")
    return "\n".join(blocks) + "\n"
