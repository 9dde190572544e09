"""Settings of the prefill stream, its consumers and the KV buckets.

Defaults are what a single box or a small cluster wants; the daemons' typed config
builds these with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.errors import ConfigError
from splitserve.priority import PRIORITIES
from splitserve.queue.subjects import validate_priority

REPLICA_COUNTS = (1, 3, 5)  # Raft needs an odd group; 3 survives one lost node, 5 two


def _validate_replicas(field_name: str, replicas: int) -> None:
    if replicas not in REPLICA_COUNTS:
        raise ConfigError(field_name, f"must be one of {REPLICA_COUNTS}, got {replicas!r}")


@dataclass(frozen=True)
class PrefillQueueSettings:
    """`SPLITSERVE_PREFILL` and its durable pull consumers.

    - duplicate_window_s: a re-publish of the same `<request_id>:<attempt>` within
      this window is stored once (2 min covers any publish retry loop).
    - max_age_s: jobs nobody took are dropped; leases are seconds long, so a job
      older than 15 min can only be terminated as expired anyway.
    - ack_wait_s: a job not acked, nak-ed or heartbeated (`in_progress`) for this
      long is redelivered; prefill workers heartbeat long prompts.
    - max_deliver: after this many deliveries a job is no longer delivered (a
      poison job must not cycle through every worker forever); it stays in the
      stream until max_age_s, so the queue depth is read from the consumers.
    - max_msgs, max_bytes: a full stream refuses new jobs (discard=new) and the
      decode worker prefills locally. 10,000 jobs are minutes of work for any
      realistic prefill fleet; a job is ~3 B per prompt token (packed varints)
      plus ~200 B, so 256 MiB holds 10,000 jobs of ~8,000 tokens. -1: unlimited.
    - direct_inactive_threshold_s: a direct consumer nobody pulled from for this
      long (its worker is gone) is deleted by the server; None keeps it forever.
    - replicas: copies of the stream (and its consumers) in a NATS cluster: 1 on a
      single server, 3 or 5 in a cluster (a majority must stay up).
    """

    priorities: tuple[str, ...] = PRIORITIES
    duplicate_window_s: float = 120.0
    max_age_s: float = 900.0
    max_msgs: int = 10_000
    max_bytes: int = 256 * 1024 * 1024
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1024
    direct_inactive_threshold_s: float | None = 3600.0
    replicas: int = 1

    def __post_init__(self) -> None:
        if not self.priorities:
            raise ConfigError("queue.priorities", "at least one priority class is needed")
        if len(set(self.priorities)) != len(self.priorities):
            raise ConfigError("queue.priorities", f"duplicates in {self.priorities}")
        for priority in self.priorities:
            validate_priority(priority)
        if self.duplicate_window_s <= 0:
            raise ConfigError("queue.duplicate_window_s", "must be > 0")
        if self.max_age_s < self.duplicate_window_s:
            raise ConfigError("queue.max_age_s",
                              f"{self.max_age_s} is below duplicate_window_s "
                              f"{self.duplicate_window_s}")
        if self.ack_wait_s <= 0:
            raise ConfigError("queue.ack_wait_s", "must be > 0")
        if self.max_deliver < 1:
            raise ConfigError("queue.max_deliver", "must be >= 1")
        if self.max_ack_pending < 1:
            raise ConfigError("queue.max_ack_pending", "must be >= 1")
        for name, limit in (("max_msgs", self.max_msgs), ("max_bytes", self.max_bytes)):
            if limit != -1 and limit < 1:
                raise ConfigError(f"queue.{name}", f"must be -1 (unlimited) or >= 1, got {limit}")
        _validate_replicas("queue.replicas", self.replicas)


@dataclass(frozen=True)
class BucketSettings:
    """`splitserve-workers` and `splitserve-policy`.

    - worker_ttl_s: a worker whose heartbeat stopped disappears after this long;
      the registry heartbeats every worker_ttl_s / 3.
    - worker_marker_ttl_s: how long the server-written expiry marker stays, so a
      watcher that reconnects within it still learns a worker expired.
    - policy_history: past policy revisions kept for inspection and rollback.
    - replicas: copies of each bucket in a NATS cluster (1, 3 or 5).
    """

    worker_ttl_s: float = 15.0
    worker_marker_ttl_s: float = 60.0
    policy_history: int = 5
    replicas: int = 1

    def __post_init__(self) -> None:
        if self.worker_ttl_s < 1.0:
            raise ConfigError("buckets.worker_ttl_s", "must be >= 1 s (server TTL granularity)")
        if self.worker_marker_ttl_s < 1.0:
            raise ConfigError("buckets.worker_marker_ttl_s", "must be >= 1 s")
        if not 1 <= self.policy_history <= 64:
            raise ConfigError("buckets.policy_history", "must be in [1, 64]")
        _validate_replicas("buckets.replicas", self.replicas)
