"""The prefill work queue: publish jobs, pull them in batches, settle each one.

Life cycle of a job on the broker:

1. The decode worker calls `publish_job` with `Nats-Msg-Id = <request_id>:<attempt>`;
   a retry of the same attempt (a lost PubAck) is de-duplicated by the stream. A
   full stream refuses it (QueueFull); a Msg-Id stored by another publish is
   refused too (DuplicateJob): the decode worker then prefills locally.
2. A prefill worker's `JobConsumer.fetch` pulls a batch; each job is now pending
   on that consumer for AckWait.
3. The worker heartbeats `in_progress()` on long prompts, then `ack()` after the KV
   write, `nak(delay_s)` to hand it back, or `term()` (malformed, lease expired).
   Work-queue retention deletes the job from the stream on ack or term.
4. Without any of these, the job is redelivered after AckWait, at most
   `max_deliver` times in all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from splitserve.errors import SplitserveError
from splitserve.queue.errors import (
    ConnectionClosed,
    DuplicateJob,
    JobAlreadySettled,
    MalformedMessage,
    PublishFailed,
    QueueFull,
)
from splitserve.queue.messages import PrefillJob, decode_job, encode_job, job_msg_id
from splitserve.queue.streams import ensure_consumer
from splitserve.queue.subjects import STREAM_PREFILL, direct_subject, shared_subject

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
_RETRY_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)


def _backoff_s(num_tries: int) -> float:
    """The pause after the `num_tries`-th failed try of a publish or an ack."""
    return _RETRY_BACKOFF_S[min(num_tries - 1, len(_RETRY_BACKOFF_S) - 1)]


# How long an ack is retried: a NATS stream leader election takes a few seconds (one
# seen in the chaos suite: 5.3 s), well within the default AckWait (30 s).
ACK_RETRY_S = 10.0
_MIN_PULL_S = 0.002  # a pull request shorter than this expires before it reaches the broker
# JSStreamStoreFailedError (code 503): "maximum messages exceeded", "maximum bytes
# exceeded", "storage resources exceeded". A limit, not an outage: never retried.
_ERR_STREAM_STORE_FAILED = 10077


def job_subject(job: PrefillJob, prefill_worker_id: str | None = None) -> str:
    """The shared subject of the job's priority, or one prefill worker's direct one."""
    if prefill_worker_id is None:
        return shared_subject(job.priority)
    return direct_subject(prefill_worker_id)


async def publish_job(
    js: JetStreamContext,
    job: PrefillJob,
    *,
    prefill_worker_id: str | None = None,
    timeout_s: float = 2.0,
    retry_for_s: float = 10.0,
) -> int:
    """Store `job` in SPLITSERVE_PREFILL and return its stream sequence.

    Stamps `publish_time_unix_ns` if unset. Transient failures (broker restarting,
    no PubAck in `timeout_s`) are retried with the same Msg-Id for `retry_for_s`,
    so a job is stored once even if a PubAck was lost; then PublishFailed.
    Callers bound `retry_for_s` by the job's lease. Raises at once, without
    retrying: QueueFull when the stream is at its limits, DuplicateJob when the
    Msg-Id was already stored by someone else (both are PublishFailed).
    """
    if job.publish_time_unix_ns == 0:
        stamped = PrefillJob()
        stamped.CopyFrom(job)
        stamped.publish_time_unix_ns = time.time_ns()
        job = stamped
    payload = encode_job(job)
    subject = job_subject(job, prefill_worker_id)
    msg_id = job_msg_id(job)
    deadline = time.monotonic() + retry_for_s
    num_tries = 0
    # True once a try ended without an answer: the broker may have stored it and
    # lost the PubAck, so a later duplicate PubAck is that try's, i.e. success.
    maybe_stored = False
    while True:
        num_tries += 1
        try:
            ack = await js.publish(subject, payload, timeout=timeout_s, stream=STREAM_PREFILL,
                                   headers={MSG_ID_HEADER: msg_id})
        except nats.errors.ConnectionClosedError as err:
            raise PublishFailed(job.request_id, job.attempt, subject, "connection closed") from err
        except (NoStreamResponseError, nats.errors.NoRespondersError,
                nats.errors.OutboundBufferLimitError) as err:
            reason = f"{type(err).__name__} after {num_tries} tries"  # surely not stored
        except (TimeoutError, nats.errors.TimeoutError,
                nats.errors.ConnectionReconnectingError) as err:
            maybe_stored = True
            reason = f"{type(err).__name__} after {num_tries} tries"
        except APIError as err:
            if err.err_code == _ERR_STREAM_STORE_FAILED:
                raise QueueFull(job.request_id, job.attempt, subject,
                                str(err.description)) from err
            if err.code != 503:
                raise PublishFailed(job.request_id, job.attempt, subject,
                                    str(err.description)) from err
            reason = f"JetStream unavailable after {num_tries} tries"
        else:
            if ack.duplicate and not maybe_stored:
                raise DuplicateJob(job.request_id, job.attempt, int(ack.seq), subject)
            log.debug("request %s attempt %d: published to %s seq %d after %d tries%s",
                         job.request_id, job.attempt, subject, ack.seq, num_tries,
                         " (an earlier try's PubAck was lost)" if ack.duplicate else "")
            return int(ack.seq)
        delay_s = _backoff_s(num_tries)
        if time.monotonic() + delay_s >= deadline:
            raise PublishFailed(job.request_id, job.attempt, subject, reason)
        log.info("request %s attempt %d: publish retry (%s)", job.request_id, job.attempt,
                    reason)
        await asyncio.sleep(delay_s)


@dataclass
class JobDelivery:
    """One delivery of a PrefillJob to this worker, and the verbs that settle it.

    `num_delivered` is 1 on first delivery, 2 on the first redelivery, and so on.
    The verbs never raise on broker trouble: they return False and log; the broker
    then redelivers after AckWait, which leases and de-dup make safe.
    """

    job: PrefillJob
    msg: Msg
    num_delivered: int
    stream_seq: int

    @property
    def request_id(self) -> str:
        return self.job.request_id

    def lease_remaining_s(self, margin_s: float, now_unix_ns: int | None = None) -> float:
        """Seconds left to post transfers: the lease deadline minus the clock-skew
        margin. At or below 0 the fence invariant forbids any write; term the job."""
        now_ns = time.time_ns() if now_unix_ns is None else now_unix_ns
        return (self.job.lease_deadline_unix_ns - now_ns) / 1e9 - margin_s

    async def in_progress(self) -> bool:
        """Reset the AckWait timer (heartbeat while a long prompt is prefilled)."""
        return await self._settle("in_progress", self.msg.in_progress())

    async def ack(self, timeout_s: float = 2.0, retry_for_s: float = ACK_RETRY_S) -> bool:
        """Done: the job leaves the stream. Waits for the broker to confirm, and asks
        again for `retry_for_s` while it does not (restarting, electing a stream
        leader: NoResponders at once, or no answer): a job left unacked is redelivered
        after AckWait, and until then counts in the queue depth that routing reads.
        Acking twice is harmless (the broker keeps no state for an acked job)."""
        deadline = time.monotonic() + retry_for_s
        num_tries = 0
        while True:
            num_tries += 1
            try:
                await self.msg.ack_sync(timeout=timeout_s)
                return True
            except nats.errors.MsgAlreadyAckdError:
                raise JobAlreadySettled(self.job.request_id, self.job.attempt, "ack") from None
            except (TimeoutError, nats.errors.Error) as err:
                delay_s = _backoff_s(num_tries)
                if (isinstance(err, nats.errors.ConnectionClosedError)
                        or time.monotonic() + delay_s >= deadline):
                    return self._settle_failed("ack", err, num_tries)
            await asyncio.sleep(delay_s)

    async def nak(self, delay_s: float | None = None) -> bool:
        """Hand the job back; redelivered after `delay_s` (at once if None)."""
        return await self._settle("nak", self.msg.nak(delay=delay_s))

    async def term(self) -> bool:
        """Never redeliver (malformed, or the lease has expired)."""
        return await self._settle("term", self.msg.term())

    async def _settle(self, verb: str, call: Awaitable[object]) -> bool:
        try:
            await call
        except nats.errors.MsgAlreadyAckdError:
            raise JobAlreadySettled(self.job.request_id, self.job.attempt, verb) from None
        except (TimeoutError, nats.errors.Error) as err:
            return self._settle_failed(verb, err, 1)
        return True

    def _settle_failed(self, verb: str, err: BaseException, num_tries: int) -> bool:
        log.warning("request %s attempt %d: %s failed after %d tries (%s: %s); the broker "
                    "redelivers after AckWait", self.job.request_id, self.job.attempt, verb,
                    num_tries, type(err).__name__, err)
        return False


class JobConsumer:
    """Pulls PrefillJobs from one durable consumer of SPLITSERVE_PREFILL.

    A prefill worker holds one per source it serves (its direct consumer, then the
    shared consumer of each priority) and polls them in its own order. `fetch`
    never raises on broker trouble: during an outage or a broker restart it waits
    about `timeout_s` and returns [], and once the broker is back it resumes (the
    durable consumer lives in the file store; if it was lost it is re-created).
    Malformed payloads are terminated and logged, never returned.
    """

    def __init__(self, js: JetStreamContext, config: api.ConsumerConfig,
                 sub: JetStreamContext.PullSubscription) -> None:
        assert config.durable_name is not None
        self.js = js
        self.config = config
        self.name: str = config.durable_name
        self._sub = sub
        self._failing_since: float | None = None

    @classmethod
    async def bind(cls, js: JetStreamContext, config: api.ConsumerConfig) -> JobConsumer:
        """Ensure the durable consumer exists with `config`, then subscribe to it."""
        await ensure_consumer(js, config)
        sub = await js.pull_subscribe_bind(durable=config.durable_name, stream=STREAM_PREFILL)
        return cls(js, config, sub)

    async def fetch(self, max_jobs: int, timeout_s: float) -> list[JobDelivery]:
        """Up to `max_jobs` jobs: returns as soon as some are available, after at most
        about `timeout_s` with [] when none arrived."""
        try:
            msgs = await self._sub.fetch(batch=max_jobs, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError as err:
            raise ConnectionClosed(f"consumer {self.name}: connection closed") from err
        except (nats.errors.Error, APIError) as err:
            await self._on_fetch_error(err, timeout_s)
            return []
        if self._failing_since is not None:
            log.info("consumer %s: fetching again after %.1fs of errors", self.name,
                        time.monotonic() - self._failing_since)
            self._failing_since = None
        deliveries = []
        for msg in msgs:
            delivery = await self._decode(msg)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def fetch_first(self, timeout_s: float) -> list[JobDelivery]:
        """One job, the moment one is there (a pull for several lingers on the broker
        until its expiry once it has one: the job would wait out the timeout); []
        after about `timeout_s` without one."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > _MIN_PULL_S:
            if batch := await self.fetch(1, left_s):
                return batch  # [] sooner than the timeout: a malformed job was dropped
        return []

    async def fetch_batch(self, max_jobs: int, timeout_s: float,
                          window_s: float) -> list[JobDelivery]:
        """Adaptive batching: wait up to `timeout_s` for a first job (`fetch_first`),
        then at most `window_s` more for others to join the batch."""
        batch = await self.fetch_first(timeout_s)
        if batch and max_jobs > 1 and window_s > 0:
            batch += await self.fetch(max_jobs - 1, window_s)
        return batch

    async def num_pending(self) -> int:
        """Jobs waiting in this consumer (not yet delivered), for stats and planning."""
        info = await self.js.consumer_info(STREAM_PREFILL, self.name)
        return int(info.num_pending or 0)

    async def close(self) -> None:
        try:
            await self._sub.unsubscribe()
        except nats.errors.Error as err:
            log.debug("consumer %s: unsubscribe failed: %s", self.name, err)

    async def _decode(self, msg: Msg) -> JobDelivery | None:
        meta = msg.metadata
        try:
            job = decode_job(msg.data)
        except MalformedMessage as err:
            log.error("consumer %s: terminating malformed job at stream seq %d on %s "
                         "(delivery %d): %s", self.name, meta.sequence.stream, msg.subject,
                         meta.num_delivered, err)
            try:
                await msg.term()
            except nats.errors.Error as term_err:
                log.warning("consumer %s: term of seq %d failed: %s", self.name,
                               meta.sequence.stream, term_err)
            return None
        return JobDelivery(job=job, msg=msg, num_delivered=meta.num_delivered,
                           stream_seq=meta.sequence.stream)

    async def _on_fetch_error(self, err: Exception, timeout_s: float) -> None:
        first = self._failing_since is None
        if first:
            self._failing_since = time.monotonic()
        say = log.warning if first else log.debug
        say("consumer %s: fetch failed (%s: %s); retrying", self.name, type(err).__name__, err)
        # Never spin: errors during a reconnect can come back at once.
        await asyncio.sleep(min(timeout_s, 1.0))
        await self._recreate_if_missing()

    async def _recreate_if_missing(self) -> None:
        try:
            await self.js.consumer_info(STREAM_PREFILL, self.name)
        except NotFoundError:
            log.warning("consumer %s: missing on the broker; re-creating it", self.name)
            try:
                await ensure_consumer(self.js, self.config)
            except (SplitserveError, nats.errors.Error) as err:
                log.warning("consumer %s: re-create failed: %s", self.name, err)
        except (TimeoutError, nats.errors.Error, APIError):
            pass  # Broker still away; the next fetch retries.
