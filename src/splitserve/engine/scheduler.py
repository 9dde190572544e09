"""Continuous batching with chunked prefill, a prefix cache and preemption.

Each step the scheduler hands the runner a list of (sequence, number of new tokens)
under a token budget:
1. one token for each running sequence in decode;
2. then class by class, high before normal before low: the next chunks of the class's
   running prompts (in admission order), then its waiting sequences (oldest first)
   while the budget, `max_num_seqs` and free pages allow, then the class's top-up (3).
   A waiting sequence first takes whatever prefix the cache holds; when
   `max_num_seqs` are running, a high one takes the place of one of a lower class
   (preempted as below; such a preemption, unlike one for pages, does not stop
   admission). So a high request that arrives while lower ones are mid-prompt or fill
   every place is computed in the next step, not after them (`benchmarks/overload.py`,
   admission on, seeds 0-2 pooled: high TTFT p99 3.22 s when it waited, 2.17 s with
   this). A normal one waits for a place: its SLO is not that tight, and taking the
   places of low requests already admitted (and promised theirs) starved them;
3. a prompt's chunk is at most `max_prefill_chunk_tokens`, so that a long prompt does
   not take the whole budget from the short ones behind it (which would wait for all
   of it); but a prompt whose rest is within a chunk and a half, and fits the budget,
   is taken whole: a tail of at most half a chunk left for the next step would delay
   its first token by that whole step, for little work (`benchmarks/overload.py`'s
   64- to 192-token prompts, 128-token cap, 5x load: 31 of the 62 high-priority prompts
   over 128 tokens took a second ~0.6 s step); budget still left after a class then
   tops up its capped chunks in order, so a prompt alone in the step is not slowed
   down, unless the step completes a prompt of that class or a higher one: its first
   token would wait for the extra chunk (a short prompt next to a long one on a CPU
   core: 176 instead of 256 tokens, ~0.3 instead of ~0.45 s).
While sequences of a class with a TPOT SLO decode, the budget is what keeps each one's
mean time per token (after its first, as TPOT is judged) within 0.85 × that SLO at the
pace the engine measured (engine/pace.py), not `max_num_batched_tokens`: a sequence
that has just started, or is behind, gets a step of ~0.85 × its SLO; one that has
saved time in faster steps may spend it on a bigger one (a long prompt's chunk then
stalls it for a step, within its SLO, instead of slowing each of its tokens for many
steps). The chunk cap shrinks in proportion, so a long prompt still leaves room for
the short ones behind it (with the whole cap, a 1-2k-token prompt took all of a ~50-token paced step for ~40 steps:
`benchmarks/serve_interference.py` colocated, short prompts' TTFT p99 10.4 s).
When a running sequence needs a page and none is free, the most recently admitted
running sequence of the lowest priority class is preempted: its pages are freed (full
ones stay in the prefix cache) and it goes back to the front of its class in the
waiting queue, to be recomputed. A waiting sequence that does not fit may likewise
preempt running sequences of a lower class than its own (never of its own or higher).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

from splitserve.engine.chunking import paced_cap, prefill_chunk
from splitserve.engine.pace import MARGIN, MIN_PREFILL_TOKENS, StepPace
from splitserve.engine.page_allocator import PageAllocator, page_hashes
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.priority import HIGH


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every token has K/V, so the step samples a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class PreemptReason(Enum):
    PAGES = "pool full"
    PLACE = "place for a higher class"  # max_num_seqs running; a high request came


@dataclass(frozen=True)
class Preempted:
    seq: Sequence
    reason: PreemptReason


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Preempted] = field(default_factory=list)
    # A sequence was preempted for pages: the pool is full, so admitting more this
    # step would only thrash (a preemption for a place frees one; others may follow).
    short_of_pages: bool = False
    budget: int = 0  # the step's token budget (less than the most while paced)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_prefill_chunk_tokens: int | None = None,
        tpot_slo_s: Seq[float] = (),
    ) -> None:
        """`tpot_slo_s`: each class's TPOT SLO by rank (0 or none: no pacing)."""
        self.allocator = allocator
        self.page_size = allocator.page_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_cap = max_prefill_chunk_tokens or max_num_batched_tokens
        self.step_cap = self.chunk_cap  # this step's (less while paced)
        self.tpot_slo_s = tuple(tpot_slo_s)
        self.pace = StepPace()  # the engine tells it each step's tokens and duration
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Called before a sequence's pages are freed; pages it removes from
        # `seq.page_ids` are not freed (remote prefill quarantines landing pages).
        self.release_hook: Callable[[Sequence], None] | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Behind every waiting sequence of its class or a higher one."""
        index = next((i for i, other in enumerate(self.waiting) if other.rank > seq.rank),
                     len(self.waiting))
        self.waiting.insert(index, seq)

    def requeue(self, seq: Sequence) -> None:
        """At the front of its class (a preempted sequence keeps its turn)."""
        index = next((i for i, other in enumerate(self.waiting) if other.rank >= seq.rank),
                     len(self.waiting))
        self.waiting.insert(index, seq)

    def _victim(self, below_rank: int = -1) -> Sequence | None:
        """The running sequence to preempt: the most recently admitted of the lowest
        class; with `below_rank`, only of a class lower than that (else None)."""
        candidates = [s for s in self.running if s.rank > below_rank]
        if not candidates:
            return None
        lowest = max(s.rank for s in candidates)
        return [s for s in candidates if s.rank == lowest][-1]

    def _could_make_room(self, rank: int, num_pages: int) -> bool:
        """Would preempting every running sequence of a class below `rank` free enough
        pages? (Else preempting them would only waste their work.)"""
        lower = [s for s in self.running if s.rank > rank]
        freeable = sum(1 for s in lower for p in s.page_ids if self.allocator.ref_count(p) == 1)
        return bool(lower) and self.allocator.num_free_pages + freeable >= num_pages

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """The next step's work; `now` (monotonic, default the clock) paces it."""
        # Snapshots in admission order: preemptions below change `self.running`.
        decoding = [s for s in self.running if s.num_uncomputed_tokens <= 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        budget = self._paced_budget(decoding, time.monotonic() if now is None else now)
        self.step_cap = paced_cap(self.chunk_cap, budget, self.max_num_batched_tokens)
        out = SchedulerOutput(budget=budget)
        budget = self._schedule_running(decoding, budget, out)
        for rank in sorted({s.rank for s in self.running} | {s.rank for s in self.waiting}):
            budget = self._schedule_running([s for s in prefilling if s.rank == rank],
                                            budget, out)
            budget = self._admit(rank, budget, out)
            budget = self._top_up(out, budget, rank)
        return out

    def _paced_budget(self, decoding: list[Sequence], now: float) -> int:
        """The tokens of a step that keeps every decoding sequence's mean time per
        token since its first within MARGIN × its class's TPOT SLO."""
        allowed = [self._slack_s(s, MARGIN * self.tpot_slo_s[s.rank], now) for s in decoding
                   if s.rank < len(self.tpot_slo_s) and self.tpot_slo_s[s.rank] > 0]
        fits = self.pace.tokens_within(min(allowed)) if allowed else None
        if fits is None:
            return self.max_num_batched_tokens
        return min(self.max_num_batched_tokens,
                   max(fits, len(decoding) + MIN_PREFILL_TOKENS))

    @staticmethod
    def _slack_s(seq: Sequence, target_s: float, now: float) -> float:
        """How long the next step may take: `target_s` plus what `seq` saved in faster
        steps (its mean time per token after its first stays within `target_s`). A
        sequence behind (preempted, stalled) gets `target_s`, as if just started: it
        does not hold every step to the floor until it has caught up."""
        if seq.first_token_s is None:
            return target_s
        saved = target_s * (seq.num_output_tokens - 1) - (now - seq.first_token_s)
        return target_s + max(0.0, saved)

    def _schedule_running(self, seqs: list[Sequence], budget: int,
                          out: SchedulerOutput) -> int:
        for seq in seqs:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = prefill_chunk(seq.num_uncomputed_tokens, budget, self.step_cap)
            if not self._reserve_pages(seq, num_new, out):
                continue
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget

    def _admit(self, rank: int, budget: int, out: SchedulerOutput) -> int:
        """Waiting sequences of class `rank` (the queue's head while it is of it)."""
        while (self.waiting and self.waiting[0].rank == rank and budget > 0
               and not out.short_of_pages):
            seq = self.waiting[0]
            if len(self.running) >= self.max_num_seqs:
                victim = self._victim(below_rank=seq.rank) if seq.rank == HIGH else None
                if victim is None:
                    break
                budget += self._preempt_scheduled(victim, out, PreemptReason.PLACE)
            self.take_cached_prefix(seq)
            num_new = prefill_chunk(seq.num_uncomputed_tokens, budget, self.step_cap)
            num_pages = self._num_pages_needed(seq, num_new)
            if not self.allocator.can_allocate(num_pages) and self._could_make_room(
                    seq.rank, num_pages):
                out.short_of_pages = True
                while not self.allocator.can_allocate(num_pages):
                    victim = self._victim(below_rank=seq.rank)
                    assert victim is not None
                    budget += self._preempt_scheduled(victim, out)
            if not self.allocator.can_allocate(num_pages):
                self.release_pages(seq)  # cached pages must not sit idle in the queue
                break
            seq.page_ids += self.allocator.allocate(num_pages)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget

    def _top_up(self, out: SchedulerOutput, budget: int, rank: int) -> int:
        """Hand budget left over to capped prompt chunks of class `rank`, in order, as
        far as free pages allow without preempting anyone; none when a prompt of this
        class or a higher one completes this step."""
        if any(item.completes and item.seq.num_computed_tokens < item.seq.num_prompt_tokens
               and item.seq.rank <= rank for item in out.scheduled):
            return budget
        for i, item in enumerate(out.scheduled):
            if budget == 0:
                break
            seq = item.seq
            more = min(seq.num_uncomputed_tokens - item.num_new_tokens, budget)
            if seq.rank != rank or more <= 0:
                continue
            num_pages = self._num_pages_needed(seq, item.num_new_tokens + more)
            if not self.allocator.can_allocate(num_pages):
                continue
            seq.page_ids += self.allocator.allocate(num_pages)
            out.scheduled[i] = ScheduledSequence(seq, item.num_new_tokens + more)
            budget -= more
        return budget

    def update(self, scheduled: Seq[ScheduledSequence]) -> None:
        """After the runner computed a step: advance counters, publish full pages."""
        for item in scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self._publish_full_pages(seq)

    def finish(self, seq: Sequence, keep_pages: bool = False) -> None:
        """Remove a finished or aborted sequence and free its pages (unless kept,
        for a prefill whose pages still have to be transferred)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not keep_pages:
            self.release_pages(seq)
        seq.status = SequenceStatus.FINISHED

    # --- internals ----------------------------------------------------------------
    def _num_pages_needed(self, seq: Sequence, num_new: int) -> int:
        total = -(-(seq.num_computed_tokens + num_new) // self.page_size)
        return max(0, total - len(seq.page_ids))

    def _reserve_pages(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        num_pages = self._num_pages_needed(seq, num_new)
        while not self.allocator.can_allocate(num_pages):
            out.short_of_pages = True
            victim = self._victim()
            assert victim is not None  # `seq` itself is running
            self._preempt_scheduled(victim, out)
            if victim is seq:
                return False
        seq.page_ids += self.allocator.allocate(num_pages)
        return True

    def _preempt_scheduled(self, victim: Sequence, out: SchedulerOutput,
                           reason: PreemptReason = PreemptReason.PAGES) -> int:
        """Preempt `victim`, also out of this step; returns the budget it had taken."""
        self._preempt(victim)
        out.preempted.append(Preempted(victim, reason))
        freed = sum(s.num_new_tokens for s in out.scheduled if s.seq is victim)
        out.scheduled = [s for s in out.scheduled if s.seq is not victim]
        return freed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release_pages(seq)
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.requeue(seq)
        self.num_preemptions += 1

    def release_pages(self, seq: Sequence) -> None:
        if self.release_hook is not None:
            self.release_hook(seq)
        self.allocator.free(seq.page_ids)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.num_cached_pages_published = 0

    def take_cached_prefix(self, seq: Sequence) -> None:
        self._extend_hashes(seq, seq.num_tokens)
        # At least one token must be computed: it yields the logits to sample from.
        max_pages = (seq.num_tokens - 1) // self.page_size
        page_ids = self.allocator.match_prefix(seq.page_hashes[:max_pages])
        seq.page_ids = page_ids
        seq.num_computed_tokens = len(page_ids) * self.page_size
        seq.num_cached_pages_published = len(page_ids)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def _publish_full_pages(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.page_size
        if num_full <= seq.num_cached_pages_published:
            return
        self._extend_hashes(seq, num_full * self.page_size)
        start = seq.num_cached_pages_published
        self.allocator.cache_pages(seq.page_ids[start:num_full], seq.page_hashes[start:num_full])
        seq.num_cached_pages_published = num_full

    def _extend_hashes(self, seq: Sequence, num_tokens: int) -> None:
        num_full = num_tokens // self.page_size
        have = len(seq.page_hashes)
        if num_full > have:
            # Hashes chain from the start, so recompute over the prefix (cheap: ~1 µs/page).
            seq.page_hashes = page_hashes(seq.token_ids[: num_full * self.page_size],
                                          self.page_size)
