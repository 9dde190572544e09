"""Create the prefill stream, its consumers and the KV buckets, idempotently.

Every daemon calls `ensure_*` at startup, so several may race: creating something
that already exists with the same settings is a no-op; with different settings
the broker is asked to update it in place; what it cannot update (retention,
storage, ack policy...) raises ConfigMismatch naming the settings that differ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import Enum

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError
from nats.js.kv import KeyValue

from splitserve.queue.errors import ConfigMismatch, QueueSetupError
from splitserve.queue.settings import BucketSettings, PrefillQueueSettings
from splitserve.queue.subjects import (
    BUCKET_POLICY,
    BUCKET_WORKERS,
    PREFILL_DIRECT_WILDCARD,
    PREFILL_SHARED_WILDCARD,
    STREAM_PREFILL,
    direct_consumer_name,
    direct_subject,
    shared_consumer_name,
    shared_subject,
)

log = logging.getLogger(__name__)

_ERR_STREAM_NAME_IN_USE = 10058
_KV_DUPLICATE_WINDOW_S = 120.0


def _norm(value: object) -> object:
    """Compare server-returned and wanted values: enums by value, floats to the ms
    (durations round-trip through ns), lists as sorted tuples."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, list | tuple):
        return tuple(sorted(str(v) for v in value))
    return value


def _diff(existing: object, wanted: object, fields: Iterable[str]) -> dict[str, tuple[object, object]]:
    diffs: dict[str, tuple[object, object]] = {}
    for name in fields:
        old, new = getattr(existing, name), getattr(wanted, name)
        if _norm(old) != _norm(new):
            diffs[name] = (_norm(old), _norm(new))
    return diffs


async def _ensure_stream(js: JetStreamContext, kind: str, wanted: api.StreamConfig,
                         fields: tuple[str, ...]) -> api.StreamInfo:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        try:
            info = await js.add_stream(wanted)
            log.info("created %s %s", kind, wanted.name)
            return info
        except APIError as err:
            if err.err_code != _ERR_STREAM_NAME_IN_USE:
                raise QueueSetupError(kind, wanted.name, str(err.description)) from err
            # Another daemon created it a moment ago with other settings.
            info = await js.stream_info(wanted.name)
    diffs = _diff(info.config, wanted, fields)
    if not diffs:
        return info
    update = info.config.evolve(**{name: getattr(wanted, name) for name in fields})
    try:
        info = await js.update_stream(update)
    except APIError as err:
        raise ConfigMismatch(kind, wanted.name, diffs, str(err.description)) from err
    log.warning("updated %s %s: %s", kind, wanted.name, diffs)
    return info


_PREFILL_STREAM_FIELDS = ("subjects", "retention", "storage", "discard", "max_age",
                          "duplicate_window", "max_msgs", "max_bytes", "num_replicas")


def prefill_stream_config(settings: PrefillQueueSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=STREAM_PREFILL,
        description="splitserve prefill jobs (work queue)",
        subjects=[PREFILL_SHARED_WILDCARD, PREFILL_DIRECT_WILDCARD],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        # When full, refuse new jobs (the decode worker then prefills locally)
        # rather than silently dropping queued ones.
        discard=api.DiscardPolicy.NEW,
        max_age=settings.max_age_s,
        duplicate_window=settings.duplicate_window_s,
        max_msgs=settings.max_msgs,
        max_bytes=settings.max_bytes,
        num_replicas=settings.replicas,
    )


async def ensure_prefill_stream(js: JetStreamContext,
                                settings: PrefillQueueSettings) -> api.StreamInfo:
    return await _ensure_stream(js, "stream", prefill_stream_config(settings),
                                _PREFILL_STREAM_FIELDS)


_CONSUMER_FIELDS = ("filter_subject", "ack_policy", "deliver_policy", "ack_wait",
                    "max_deliver", "max_ack_pending", "inactive_threshold")


def consumer_config(name: str, filter_subject: str, settings: PrefillQueueSettings,
                    inactive_threshold_s: float | None = None) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=filter_subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        inactive_threshold=inactive_threshold_s,
    )


async def ensure_consumer(js: JetStreamContext, wanted: api.ConsumerConfig) -> api.ConsumerInfo:
    """Create or update one durable pull consumer on the prefill stream."""
    name = wanted.durable_name
    assert name is not None
    try:
        info = await js.consumer_info(STREAM_PREFILL, name)
    except NotFoundError:
        try:
            info = await js.add_consumer(STREAM_PREFILL, wanted)
        except APIError as err:
            raise QueueSetupError("consumer", name, str(err.description)) from err
        log.info("created consumer %s on %s (filter %s)", name, STREAM_PREFILL,
                    wanted.filter_subject)
        return info
    wanted_cmp = wanted.evolve(inactive_threshold=wanted.inactive_threshold or 0.0)
    existing_cmp = info.config.evolve(inactive_threshold=info.config.inactive_threshold or 0.0)
    diffs = _diff(existing_cmp, wanted_cmp, _CONSUMER_FIELDS)
    if not diffs:
        return info
    try:
        info = await js.add_consumer(STREAM_PREFILL, wanted)
    except APIError as err:
        raise ConfigMismatch("consumer", name, diffs, str(err.description)) from err
    log.warning("updated consumer %s: %s", name, diffs)
    return info


def shared_consumer_config(priority: str, settings: PrefillQueueSettings) -> api.ConsumerConfig:
    return consumer_config(shared_consumer_name(priority), shared_subject(priority), settings)


def direct_consumer_config(worker_id: str, settings: PrefillQueueSettings) -> api.ConsumerConfig:
    return consumer_config(direct_consumer_name(worker_id), direct_subject(worker_id), settings,
                           settings.direct_inactive_threshold_s)


async def ensure_prefill_queue(js: JetStreamContext, settings: PrefillQueueSettings,
                               worker_ids: Iterable[str] = ()) -> None:
    """The stream, one shared consumer per priority (all prefill workers pull from
    it) and one direct consumer per given prefill worker. Filters never overlap, as
    a work-queue stream requires."""
    await ensure_prefill_stream(js, settings)
    for priority in settings.priorities:
        await ensure_consumer(js, shared_consumer_config(priority, settings))
    for worker_id in worker_ids:
        await ensure_consumer(js, direct_consumer_config(worker_id, settings))


_KV_FIELDS = ("max_age", "max_msgs_per_subject", "storage", "subject_delete_marker_ttl",
              "allow_msg_ttl", "num_replicas")


def _kv_stream_config(bucket: str, description: str, history: int, ttl_s: float | None,
                      marker_ttl_s: float | None, replicas: int) -> api.StreamConfig:
    # The layout nats.py's KeyValue expects (KV_<bucket>, $KV.<bucket>.>, rollups).
    max_age = ttl_s if ttl_s is not None else 0.0
    duplicate_window = min(_KV_DUPLICATE_WINDOW_S, ttl_s) if ttl_s else _KV_DUPLICATE_WINDOW_S
    return api.StreamConfig(
        name=f"KV_{bucket}",
        description=description,
        subjects=[f"$KV.{bucket}.>"],
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=duplicate_window,
        max_age=max_age,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_msgs_per_subject=history,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
        subject_delete_marker_ttl=marker_ttl_s,
    )


async def _ensure_bucket(js: JetStreamContext, bucket: str, wanted: api.StreamConfig) -> KeyValue:
    fields: tuple[str, ...] = _KV_FIELDS
    if wanted.max_age:
        fields += ("duplicate_window",)
    await _ensure_stream(js, "bucket", wanted, fields)
    return await js.key_value(bucket)


async def ensure_workers_bucket(js: JetStreamContext, settings: BucketSettings) -> KeyValue:
    """`splitserve-workers`: history 1, entries expire `worker_ttl_s` after their
    last heartbeat; the server writes an expiry marker that watchers see."""
    return await _ensure_bucket(js, BUCKET_WORKERS, _kv_stream_config(
        BUCKET_WORKERS, "splitserve worker descriptors (heartbeat-refreshed)", history=1,
        ttl_s=settings.worker_ttl_s, marker_ttl_s=settings.worker_marker_ttl_s,
        replicas=settings.replicas))


async def ensure_policy_bucket(js: JetStreamContext, settings: BucketSettings) -> KeyValue:
    """`splitserve-policy`: no TTL, `policy_history` revisions per key."""
    return await _ensure_bucket(js, BUCKET_POLICY, _kv_stream_config(
        BUCKET_POLICY, "splitserve routing thresholds and QoS knobs", history=settings.policy_history,
        ttl_s=None, marker_ttl_s=None, replicas=settings.replicas))


async def ensure_messaging(js: JetStreamContext, queue: PrefillQueueSettings,
                           buckets: BucketSettings) -> None:
    """Everything a cluster needs on the broker; safe to call from every daemon."""
    await ensure_prefill_queue(js, queue)
    await ensure_workers_bucket(js, buckets)
    await ensure_policy_bucket(js, buckets)
