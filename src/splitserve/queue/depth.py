"""The prefill queue's depth: jobs some prefill worker will still take.

The stream's message count overstates it. A work-queue stream keeps a job until
it is acked, terminated or too old, so it also counts jobs nobody will ever take:
on a subject no consumer filters (an unknown priority, a direct subject of a
worker that has no consumer) and jobs that used up `max_deliver`. The consumers
know better: each counts the jobs on its filter it has not delivered yet
(`num_pending`) and those delivered but not settled (`num_ack_pending`).
"""

from __future__ import annotations

from nats.js import JetStreamContext, api

from splitserve.queue.settings import PrefillQueueSettings
from splitserve.queue.subjects import STREAM_PREFILL, shared_consumer_name

DIRECT_CONSUMER_PREFIX = "direct-"
# The server lists consumers 256 at a time.
_CONSUMER_LIST_PAGE = 256


def consumer_depth(info: api.ConsumerInfo) -> int:
    """Jobs waiting on one consumer plus those out with a worker, unsettled."""
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def prefill_queue_depth(js: JetStreamContext, settings: PrefillQueueSettings) -> int:
    """Sum of `consumer_depth` over the shared consumer of each priority in
    `settings.priorities` (a missing one counts 0) and every direct consumer on
    the stream. Raises nats errors when the broker does not answer; the caller
    decides what an unknown depth means."""
    shared = {shared_consumer_name(priority) for priority in settings.priorities}
    depth = 0
    offset = 0
    while True:
        page = await js.consumers_info(STREAM_PREFILL, offset=offset)
        for info in page:
            if info.name in shared or info.name.startswith(DIRECT_CONSUMER_PREFIX):
                depth += consumer_depth(info)
        if len(page) < _CONSUMER_LIST_PAGE:
            return depth
        offset += len(page)

