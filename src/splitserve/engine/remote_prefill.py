"""Sequences whose prompt is prefilled by another worker, on both sides of the transfer.

Decode side (the fence invariant, ARCHITECTURE.md):
1. `reserve`: the sequence takes its cached prefix pages, fresh *landing pages* for
   the rest of the prompt and, when the prompt ends inside a page, one more page it
   will own; it is not scheduled yet.
2. `accept` (KVReady of the current attempt): the landed pages are checked (an
   optional verifier, e.g. page checksums), then the prompt's last, partially filled
   landing page is copied into the owned page reserved in step 1, so generated tokens
   never go into a page a late write could still reach, and accepting never needs a
   free page; the sequence joins the running batch. Nothing changes before every
   fallible step has passed, so a failed accept leaves the attempt pending (to be
   retried or fallen back, its landing pages quarantined).
3. Whenever the sequence lets go of an attempt's landing pages (finish, abort,
   fallback), they are quarantined until the lease deadline plus the skew margin,
   never freed before. Only the *accepted* attempt's full landing pages are then
   published to the prefix cache, when the quarantine ends (no write can land any
   more) and the verifier still passes on them; pages of any other attempt never are.
`fallback` gives up on the remote attempt and queues the sequence for local prefill;
`retry` starts a new remote attempt on fresh landing pages.

Prefill side: `hold` runs a prompt in this engine and keeps its pages after the
first token is sampled, until `release` (after the transfer completed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

from splitserve.engine.page_allocator import PageAllocator, Publication
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class LandingPlan:
    """Where a remote prefill must write: pages for tokens [num_cached_tokens, prompt_len)."""

    request_id: str
    attempt: int
    num_cached_tokens: int
    landing_page_ids: list[int]
    release_at: float  # monotonic time after which the landing pages may be reused
    # reserved for the owned copy of a partial last landing page; None when the prompt
    # fills its last page (or lies wholly in the prefix cache)
    owned_page_id: int | None = None


class AcceptRefusal(Enum):
    """Why a KVReady was not taken into the batch."""

    STALE = "not the current attempt of a pending request"
    BAD_FIRST_TOKEN = "first token outside the vocabulary"
    CHECKSUM_MISMATCH = "landed pages fail their checksums"


PageVerifier = Callable[[list[int]], bool]  # landing page ids -> all intact?


@dataclass
class _Remote:
    seq: Sequence
    plan: LandingPlan


@dataclass(frozen=True)
class _Held:
    """An accepted attempt's landing pages, still in the running sequence."""

    page_ids: list[int]
    release_at: float
    publish: Publication


@dataclass
class RemotePrefills:
    allocator: PageAllocator
    scheduler: Scheduler
    copy_page: Callable[[int, int], None]  # copy all layers of one page (src, dst)
    _pending: dict[str, _Remote] = field(default_factory=dict)
    # landing pages still held by running sequences, by request id
    _held_landing: dict[str, _Held] = field(default_factory=dict)
    num_accepted: int = 0
    num_fallbacks: int = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def reserve(self, seq: Sequence, attempt: int, release_at: float) -> LandingPlan | None:
        """Cached prefix + landing pages for `seq`, or None when the pool cannot hold them."""
        ps = self.allocator.page_size
        self.scheduler.take_cached_prefix(seq)
        num_cached = seq.num_computed_tokens
        num_landing = -(-seq.num_prompt_tokens // ps) - len(seq.page_ids)
        num_owned = 1 if num_landing and seq.num_prompt_tokens % ps else 0
        if not self.allocator.can_allocate(num_landing + num_owned):
            self.scheduler.release_pages(seq)
            return None
        landing = self.allocator.allocate(num_landing)
        owned = self.allocator.allocate(num_owned)
        seq.page_ids += landing
        # Landing pages never enter the prefix cache (a late write may still reach them).
        seq.num_cached_pages_published = len(seq.page_ids)
        plan = LandingPlan(seq.request_id, attempt, num_cached, landing, release_at,
                           owned[0] if owned else None)
        self._pending[seq.request_id] = _Remote(seq, plan)
        return plan

    def plan(self, request_id: str) -> LandingPlan | None:
        remote = self._pending.get(request_id)
        return remote.plan if remote else None

    def accept(self, request_id: str, attempt: int,
               verify: PageVerifier | None = None) -> Sequence | AcceptRefusal:
        """KVReady arrived: move the sequence into the running batch, or say why not.
        Raises only if copying a page fails; the attempt then stays pending."""
        remote = self._pending.get(request_id)
        if remote is None or remote.plan.attempt != attempt:
            return AcceptRefusal.STALE
        seq, plan = remote.seq, remote.plan
        landing = list(plan.landing_page_ids)
        if verify is not None and not verify(landing):
            return AcceptRefusal.CHECKSUM_MISMATCH
        if plan.owned_page_id is not None:
            # Fence: the partial last page gets an owned copy before tokens are appended.
            self.copy_page(landing[-1], plan.owned_page_id)
            seq.page_ids[-1] = plan.owned_page_id
        del self._pending[request_id]
        self._held_landing[request_id] = _Held(landing, plan.release_at,
                                               self._publication(seq, plan, verify))
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.status = SequenceStatus.RUNNING
        self.scheduler.running.append(seq)
        self.num_accepted += 1
        return seq

    def extend(self, request_id: str, attempt: int, release_at: float) -> bool:
        """A renewed lease: the pending attempt's landing pages stay fenced until
        `release_at` (never earlier than before). False: not the pending attempt."""
        remote = self._pending.get(request_id)
        if remote is None or remote.plan.attempt != attempt:
            return False
        if release_at > remote.plan.release_at:
            remote.plan = replace(remote.plan, release_at=release_at)
        return True

    def fallback(self, request_id: str) -> Sequence | None:
        """Give up on the remote attempt: quarantine its pages, queue a local prefill."""
        seq = self._drop_pending(request_id)
        if seq is not None:
            self._queue_local(seq)
        return seq

    def retry(self, request_id: str, attempt: int, release_at: float) -> LandingPlan | None:
        """A new remote attempt on fresh landing pages (the old ones stay quarantined
        until their own lease ends). None: the attempt is unknown, or the pool has no
        room for new landing pages, in which case the sequence is queued for local prefill."""
        seq = self._drop_pending(request_id)
        if seq is None:
            return None
        plan = self.reserve(seq, attempt, release_at)
        if plan is None:
            self._queue_local(seq)
        return plan

    def abort(self, request_id: str) -> Sequence | None:
        return self._drop_pending(request_id)

    def release_landing(self, seq: Sequence) -> None:
        """When an accepted sequence lets go of its pages (finish, abort, preemption):
        its landing pages go to quarantine until the lease has surely expired."""
        held = self._held_landing.pop(seq.request_id, None)
        if held is not None:
            self.allocator.quarantine(held.page_ids, held.release_at, held.publish)
            landing_set = set(held.page_ids)
            seq.page_ids = [p for p in seq.page_ids if p not in landing_set]

    def _publication(self, seq: Sequence, plan: LandingPlan,
                     verify: PageVerifier | None) -> Publication:
        """The full prompt pages among `plan`'s landing pages, by their chained hashes."""
        ps = self.allocator.page_size
        hashes = seq.page_hashes[:seq.num_prompt_tokens // ps]  # from `reserve`'s lookup
        first = plan.num_cached_tokens // ps
        return Publication(
            tuple(plan.landing_page_ids),
            {page_id: hashes[first + i] for i, page_id in enumerate(plan.landing_page_ids)
             if first + i < len(hashes)},
            verify)

    def _queue_local(self, seq: Sequence) -> None:
        """Give up on remote prefill: the sequence waits for a local one, first in line
        of its priority class."""
        seq.status = SequenceStatus.WAITING
        self.scheduler.requeue(seq)
        self.num_fallbacks += 1

    def _drop_pending(self, request_id: str) -> Sequence | None:
        remote = self._pending.pop(request_id, None)
        if remote is None:
            return None
        seq, plan = remote.seq, remote.plan
        landing_set = set(plan.landing_page_ids)
        self.allocator.quarantine(plan.landing_page_ids, plan.release_at)
        owned = [] if plan.owned_page_id is None else [plan.owned_page_id]
        self.allocator.free([p for p in seq.page_ids if p not in landing_set] + owned)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.num_cached_pages_published = 0
        return seq

