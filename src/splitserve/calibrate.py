"""`splitserve calibrate`: measure local and remote prefill on a running cluster, find the
break-even prompt length and write it to the live policy.

The life of a calibration:
1. check the target is a decode worker and read the `routing` key of `splitserve-policy`
   (the override in force; the file alone when unset);
2. for each round, force each path in turn through that key: local
   (`enable_remote_prefill: false`) or remote (`prefill_length_threshold: 0`), the
   override's other fields kept, each written with compare-and-set and waited for until
   the target's GetStatus reports the revision in force;
3. under each path, send one request per length (`max_tokens` 1, random byte-range token
   ids, so nothing comes from the prefix cache) and record its Timing: the path taken,
   the attempts, the effective prompt length and the time to first token. A request
   that took the other path or needed a second attempt is not a sample of either
   (counted as `num_discarded`);
4. optionally keep `load` decode streams running on the target meanwhile, so local
   prefill competes with decode steps as it does in service;
5. fit and cross the curves (`planner.calibration`), plot them (PNG), and finally
   write the override as it was plus `prefill_length_threshold` = the break-even, or,
   with `dry_run`, with no break-even or after a failure, the override as it was
   (deleted again when it was unset).
While it runs the forced policy applies to every decode worker of the cluster: run it
when a few seconds of all-local or all-remote routing are acceptable.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from splitserve import client
from splitserve.errors import SplitserveError
from splitserve.planner.calibration import BreakEven, PrefillPath, Sample, break_even
from splitserve.policy_admin import BrokerTarget, PolicyValue, policy_store, read_policy
from splitserve.queue.errors import PolicyConflict
from splitserve.queue.policy import PolicyStore
from splitserve.routing.policy import ROUTING_POLICY_KEY, encode_override
from splitserve.rpc import generation_pb2

DEFAULT_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
POLICY_WAIT_S = 10.0  # a decode worker applies a write within milliseconds
TOKEN_IDS = range(32, 256)  # byte tokens: in every Llama vocabulary, never special
FORCED: dict[PrefillPath, dict[str, Any]] = {
    PrefillPath.LOCAL: {"enable_remote_prefill": False},
    PrefillPath.REMOTE: {"enable_remote_prefill": True, "prefill_length_threshold": 0},
}


class CalibrationError(SplitserveError):
    """A calibration could not measure (wrong target, policy not applied, no remote path)."""


@dataclass(frozen=True)
class CalibrationPlan:
    target: str
    broker: BrokerTarget
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    repeats: int = 3
    load: int = 0
    seed: int | None = None  # None: fresh prompts every run (a rerun would hit the cache)
    dry_run: bool = False
    call: client.CallOptions = client.DEFAULT_CALL  # TLS, token, connect timeout
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if len(set(self.lengths)) < 2 or min(self.lengths) < 1:
            raise CalibrationError(f"lengths: two distinct positive lengths or more, "
                                   f"got {list(self.lengths)}")
        if self.repeats < 1 or self.load < 0:
            raise CalibrationError(f"repeats must be >= 1 and load >= 0, got "
                                   f"{self.repeats} and {self.load}")


@dataclass(frozen=True)
class Calibration:
    """What a calibration measured and did. `written`: the policy value left in the
    bucket (None: the key is unset); `revision`: its revision; `note`: what happened to
    the policy, in words."""

    samples: tuple[Sample, ...]
    num_discarded: int
    result: BreakEven
    written: bytes | None
    revision: int
    note: str


class _PolicySwitch:
    """Writes the forced paths over the original override, and the final value."""

    def __init__(self, store: PolicyStore, plan: CalibrationPlan, original: PolicyValue) -> None:
        self._store = store
        self._plan = plan
        self._original = original
        self._base = original.fields() or {}
        self.revision = original.revision

    async def force(self, path: PrefillPath) -> None:
        value = encode_override({**self._base, **FORCED[path]})
        self.revision = await self._store.put(ROUTING_POLICY_KEY, value,
                                              expected_revision=self.revision)
        await self._wait_in_force()

    async def finish(self, threshold: int | None) -> tuple[bytes | None, str]:
        """Leave the original override, with `prefill_length_threshold` when given."""
        if self.revision == self._original.revision and threshold is None:
            return self._original.value, "policy unchanged"
        try:
            if threshold is not None:
                value = encode_override({**self._base, "prefill_length_threshold": threshold})
                self.revision = await self._store.put(ROUTING_POLICY_KEY, value,
                                                      expected_revision=self.revision)
                return value, (f"wrote prefill_length_threshold={threshold} to "
                               f"splitserve-policy {ROUTING_POLICY_KEY} (revision "
                               f"{self.revision})")
            if self._original.value is None:
                await self._store.delete(ROUTING_POLICY_KEY, expected_revision=self.revision)
                return None, "policy restored (key deleted, as it was unset)"
            self.revision = await self._store.put(ROUTING_POLICY_KEY, self._original.value,
                                                  expected_revision=self.revision)
            return self._original.value, f"policy restored (revision {self.revision})"
        except PolicyConflict as exc:  # someone else wrote meanwhile: theirs stands
            return None, f"policy left as another writer set it ({exc})"

    async def _wait_in_force(self) -> None:
        deadline = time.monotonic() + POLICY_WAIT_S
        while True:
            status = await client.admin_status(self._plan.target, self._plan.call)
            if status.policy_revision == self.revision:
                return
            if time.monotonic() > deadline:
                raise CalibrationError(
                    f"{self._plan.target} did not apply policy revision {self.revision} "
                    f"within {POLICY_WAIT_S:g}s (in force: {status.policy_revision}"
                    f"{', error: ' + status.policy_error if status.policy_error else ''})")
            await asyncio.sleep(0.05)


async def _timing(plan: CalibrationPlan, request: generation_pb2.GenerateRequest
                  ) -> generation_pb2.GenerateChunk.Timing:
    timing = None
    async for chunk in client.stream_generate(plan.target, request,
                                              connect_timeout_s=plan.call.connect_timeout_s,
                                              timeout_s=plan.request_timeout_s,
                                              security=plan.call.security):
        if chunk.HasField("timing"):
            timing = chunk.timing
    if timing is None:
        raise CalibrationError(f"{plan.target} finished a request without its timing")
    return timing


class _Requests:
    """Requests with fresh random prompts (distinct ids, no prefix-cache hits)."""

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self._prefix = f"calibrate-{uuid.uuid4().hex[:8]}"
        self._count = 0

    def make(self, length: int, max_tokens: int = 1) -> generation_pb2.GenerateRequest:
        self._count += 1
        return client.generate_request(
            token_ids=[self._rng.choice(TOKEN_IDS) for _ in range(length)],
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
            request_id=f"{self._prefix}-{self._count}")


async def _measure(plan: CalibrationPlan, switch: _PolicySwitch,
                   requests: _Requests) -> tuple[list[Sample], int]:
    samples: list[Sample] = []
    num_discarded = 0
    for round_index in range(plan.repeats):
        paths = list(PrefillPath) if round_index % 2 == 0 else list(reversed(PrefillPath))
        for path in paths:  # alternating order: a drift in load favors neither path
            await switch.force(path)
            if round_index == 0:  # the first request of a path warms it up (not a sample)
                await _timing(plan, requests.make(min(plan.lengths)))
            for length in plan.lengths:
                timing = await _timing(plan, requests.make(length))
                if timing.prefill != path.value or timing.num_attempts != 1:
                    num_discarded += 1
                    continue
                effective = timing.num_prompt_tokens - timing.num_cached_tokens
                samples.append(Sample(path, effective, timing.ttft_ms))
    return samples, num_discarded


@contextlib.asynccontextmanager
async def _background_load(plan: CalibrationPlan, requests: _Requests) -> AsyncIterator[None]:
    """`plan.load` decode streams on the target until the block ends."""
    async def stream() -> None:
        while True:
            await _timing(plan, requests.make(16, max_tokens=512))

    tasks = [asyncio.create_task(stream()) for _ in range(plan.load)]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _break_even(samples: Sequence[Sample], num_discarded: int) -> BreakEven:
    if not any(s.path is PrefillPath.REMOTE for s in samples):
        raise CalibrationError(
            f"no request was prefilled remotely in one attempt ({num_discarded} took "
            "another path or retried): is a prefill worker running and registered?")
    try:
        return break_even(samples)
    except ValueError as exc:
        raise CalibrationError(f"{exc} ({num_discarded} requests took another path "
                               "or retried)") from None


async def calibrate(plan: CalibrationPlan) -> Calibration:
    status = await client.admin_status(plan.target, plan.call)
    if status.role != "decode":
        raise CalibrationError(f"{plan.target} is a {status.role or 'unknown'} worker: "
                               "calibrate a decode worker")
    requests = _Requests(plan.seed)
    async with policy_store(plan.broker, plan.call.connect_timeout_s) as store:
        original = await read_policy(store, ROUTING_POLICY_KEY)
        switch = _PolicySwitch(store, plan, original)  # ConfigError: the value in force is bad
        threshold = None
        try:
            async with _background_load(plan, requests):
                samples, num_discarded = await _measure(plan, switch, requests)
            result = _break_even(samples, num_discarded)
            threshold = None if plan.dry_run else result.length
        finally:
            written, note = await switch.finish(threshold)
    if plan.dry_run:
        note = f"dry run: {note}"
    return Calibration(tuple(samples), num_discarded, result, written, switch.revision, note)
