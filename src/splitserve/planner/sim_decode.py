"""A simulated decode instance: continuous batching with chunked local prefill, advanced
by epochs rather than by steps.

What happens to a request here:
1. it arrives (local prefill) or its KV lands from the prefill pool (remote; its first
   token came with the KV) and waits in one FCFS queue;
2. at a step boundary it is admitted while fewer than `max_num_seqs` sequences run and
   its prompt fits the KV capacity;
3. a local prompt is prefilled in chunks: each step's budget (`max_num_batched_tokens`)
   goes first to one decode token per running sequence, then to the prompts in
   admission order, at most `max_prefill_chunk_tokens` each (a rest within 1.5× that,
   fitting the budget, whole: engine/chunking.py), with budget left over topping the
   capped chunks up (engine/scheduler.py); while sequences decode under TPOT pacing
   (`tpot_slo_ms`), the budget is the largest whose step keeps 0.85 × it (engine/pace.py,
   with the profile's costs for the engine's fitted line): each step, where the engine
   lets a sequence that saved time in faster steps take a bigger one (not modelled,
   so mixed steps here are as small as the engine's smallest). The step that computes
   a prompt's last chunk samples its first token (the TTFT);
4. in decode each step adds one token to every running sequence; the request finishes
   at the end of the step that produces its last token.
While no prompt is being prefilled the batch is constant between arrivals and finishes,
so the instance jumps over whole epochs: with step time dt (at the epoch's batch and
its mean context halfway to the next finish) and the steps left to the first finish
known, the next event is computed, not stepped to. An arrival during an epoch joins at
the next step boundary, where the epoch is cut. Mixed steps (with prefill chunks) are
simulated one by one; there are few (a prompt takes ~1-2 steps at the trace's lengths).
Not modelled: preemption (admission checks the KV capacity against the prompt only),
the prefix cache.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.chunking import paced_cap, prefill_chunk
from splitserve.engine.pace import MARGIN, MIN_PREFILL_TOKENS
from splitserve.planner.profile import Profile

INF = math.inf


class Phase(enum.Enum):
    IDLE = "idle"
    EPOCH = "epoch"  # decode-only steps, constant batch
    MIXED = "mixed"  # one step with prefill chunks


class Seq:
    """One request on its decode instance."""

    __slots__ = ("added_s", "arrival_s", "offset", "output", "prompt", "remote", "rid")

    def __init__(self, rid: int, prompt: int, output: int, arrival_s: float,
                 remote: bool) -> None:
        self.rid = rid
        self.prompt = prompt
        self.output = output
        self.arrival_s = arrival_s  # at the cluster
        self.added_s = arrival_s  # into this instance's queue
        self.offset = 0  # prompt tokens computed (local prefill)
        self.remote = remote


@dataclass
class Records:
    """Per request (index = request id): first token and finish times (NaN: not yet),
    the prefill path and the number of times each finished (conservation check)."""

    first_s: list[float]
    finish_s: list[float]
    remote: list[bool]
    num_finished: list[int]
    num_tokens: list[int]  # output tokens, set on arrival

    @classmethod
    def empty(cls, n: int) -> Records:
        return cls([math.nan] * n, [math.nan] * n, [False] * n, [0] * n, [0] * n)

    def tpot_ms(self, rid: int) -> float | None:
        """Mean inter-token time of a finished request (None: a single token)."""
        n = self.num_tokens[rid]
        return (self.finish_s[rid] - self.first_s[rid]) * 1e3 / (n - 1) if n > 1 else None

    def finish(self, rid: int, t: float) -> None:
        self.finish_s[rid] = t
        self.num_finished[rid] += 1


@dataclass
class Window:
    """What an instance did since the planner's last tick."""

    prefill_tokens: int = 0
    prefill_busy_s: float = 0.0
    num_prefills: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    step_ms: list[tuple[float, int]] = field(default_factory=list)  # (dt ms, steps)
    tpot_ms: list[float] = field(default_factory=list)  # of the requests finished


class DecodeInstance:
    def __init__(self, iid: int, profile: Profile, records: Records) -> None:
        self.iid = iid
        self.profile = profile
        self.records = records
        self.phase = Phase.IDLE
        self.step = 0  # steps completed
        self.decoding: list[tuple[int, int]] = []  # heap of (finish step, rid)
        self.sum_pk = 0  # sum over decoding of (prompt - join step): context = this + b·step
        self.prefilling: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.chunks: list[tuple[Seq, int]] = []  # the mixed step in progress
        self.epoch = (0.0, 0, 0.0)  # (t0, s0, dt s)
        self.wake_s = INF
        self.num_pending_remote = 0  # offloaded, KV not landed yet
        self._prompt_of: dict[int, int] = {}  # rid -> prompt - join step, of `decoding`
        self.window = Window()
        self.num_tokens_done = 0  # output tokens at the last boundary (cumulative)

    # --- the router's view --------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def load(self) -> int:
        return self.num_running + len(self.waiting) + self.num_pending_remote

    @property
    def decode_load(self) -> float:
        return self.num_running / self.profile.max_num_seqs

    @property
    def is_empty(self) -> bool:
        return self.load == 0

    def kv_tokens(self) -> int:
        used = self.sum_pk + len(self.decoding) * self.step
        return used + sum(s.prompt for s in self.prefilling)

    # --- work arriving ------------------------------------------------------------------
    def add(self, seq: Seq, now: float) -> None:
        """A local prompt, or a remote one whose KV (and first token) landed at `now`."""
        seq.added_s = now
        if seq.remote:
            self.num_pending_remote -= 1
            self._first_token(seq, now)
            if seq.output <= 1:
                self._finish(seq.rid, now)
                return
        self.waiting.append(seq)
        if self.phase is Phase.IDLE:
            self.step_to(now)
        elif self.phase is Phase.EPOCH and self._can_admit(self.waiting[0]):
            t0, s0, dt = self.epoch
            k = s0 + max(0, math.ceil((now - t0) / dt - 1e-9))
            self.wake_s = min(self.wake_s, t0 + (k - s0) * dt)

    def _first_token(self, seq: Seq, now: float) -> None:
        self.records.first_s[seq.rid] = now
        self.window.ttft_ms.append((now - seq.arrival_s) * 1e3)
        self.num_tokens_done += 1

    def _can_admit(self, seq: Seq) -> bool:
        return (self.num_running < self.profile.max_num_seqs
                and (self.num_running == 0
                     or self.kv_tokens() + seq.prompt + 1 <= self.profile.kv_capacity_tokens))

    # --- time passing -------------------------------------------------------------------
    def step_to(self, now: float) -> None:
        """Called at `wake_s` (or when idle work arrives): close what ended by `now`,
        admit, and plan the next epoch or mixed step."""
        if self.phase is Phase.EPOCH:
            self._close_epoch(now)
        elif self.phase is Phase.MIXED:
            self._close_mixed(now)
        self._admit(now)
        self._plan(now)

    def _close_epoch(self, now: float) -> None:
        t0, s0, dt = self.epoch
        k = s0 + max(0, round((now - t0) / dt))
        b = len(self.decoding)
        steps = k - s0
        if steps > 0:
            self.num_tokens_done += b * steps
            self.window.step_ms.append((dt * 1e3, steps))
        self.step = k
        while self.decoding and self.decoding[0][0] <= k:
            fs, rid = heapq.heappop(self.decoding)
            self.sum_pk -= self._prompt_of.pop(rid)
            self._finish(rid, t0 + (fs - s0) * dt)

    def _close_mixed(self, now: float) -> None:
        self.step += 1
        b = len(self.decoding)
        dt_ms = (now - self.epoch[0]) * 1e3
        if b:
            self.num_tokens_done += b
            self.window.step_ms.append((dt_ms, 1))
        while self.decoding and self.decoding[0][0] <= self.step:
            _, rid = heapq.heappop(self.decoding)
            self.sum_pk -= self._prompt_of.pop(rid)
            self._finish(rid, now)
        num_chunk = 0
        for seq, n in self.chunks:
            seq.offset += n
            num_chunk += n
            if seq.offset >= seq.prompt:
                self.prefilling.remove(seq)
                self.window.num_prefills += 1
                self._first_token(seq, now)
                if seq.output <= 1:
                    self._finish(seq.rid, now)
                else:
                    self._join(seq)
        self.window.prefill_tokens += num_chunk
        self.window.prefill_busy_s += now - self.epoch[0]
        self.chunks = []

    def _join(self, seq: Seq) -> None:
        """Into decode at the boundary `self.step`: tokens 2.. come from the next steps."""
        heapq.heappush(self.decoding, (self.step + seq.output - 1, seq.rid))
        self._prompt_of[seq.rid] = seq.prompt - self.step
        self.sum_pk += seq.prompt - self.step

    def _finish(self, rid: int, t: float) -> None:
        self.records.finish(rid, t)
        tpot = self.records.tpot_ms(rid)
        if tpot is not None:
            self.window.tpot_ms.append(tpot)

    def _admit(self, now: float) -> None:
        while self.waiting and self._can_admit(self.waiting[0]):
            seq = self.waiting.popleft()
            if seq.remote:
                self._join(seq)
            else:
                self.window.queue_ms.append((now - seq.added_s) * 1e3)
                self.prefilling.append(seq)

    def _plan(self, now: float) -> None:
        b = len(self.decoding)
        if self.prefilling:
            self.chunks, dt_ms = self._mixed_step(b)
            self.phase, self.epoch = Phase.MIXED, (now, self.step, dt_ms / 1e3)
            self.wake_s = now + dt_ms / 1e3
        elif b:
            s0, next_fs = self.step, self.decoding[0][0]
            context = self.sum_pk / b + (s0 + 1 + next_fs) / 2  # halfway to the next finish
            dt = self.profile.decode_step_ms(b, context) / 1e3
            self.phase, self.epoch = Phase.EPOCH, (now, s0, dt)
            self.wake_s = now + (next_fs - s0) * dt
        else:
            self.phase, self.wake_s = Phase.IDLE, INF

    def _mixed_step(self, b: int) -> tuple[list[tuple[Seq, int]], float]:
        """The next step's prompt chunks beside `b` decoding sequences, and its ms: the
        whole budget, or under TPOT pacing while sequences decode the largest budget
        whose step keeps MARGIN × the SLO (engine/pace.py; at least MIN_PREFILL_TOKENS
        of prompt), its chunk cap shrunk in proportion."""
        most = self.profile.max_num_batched_tokens
        chunks = self._chunks(most, b)
        dt_ms = self._step_ms(chunks, b)
        target_ms = MARGIN * self.profile.tpot_slo_ms
        if not b or not target_ms or dt_ms <= target_ms:
            return chunks, dt_ms
        fits, over = min(most, b + MIN_PREFILL_TOKENS), most  # a step's time grows with it
        while over - fits > 1:
            mid = (fits + over) // 2
            if self._step_ms(self._chunks(mid, b), b) <= target_ms:
                fits = mid
            else:
                over = mid
        chunks = self._chunks(fits, b)
        return chunks, self._step_ms(chunks, b)

    def _step_ms(self, chunks: list[tuple[Seq, int]], b: int) -> float:
        dt_ms = sum(self.profile.chunk_ms(s.offset, n) for s, n in chunks)
        if b:
            dt_ms += self.profile.decode_step_ms(b, self.sum_pk / b + self.step + 1)
        return dt_ms - self.profile.shared_step_ms(sum(1 for s, _ in chunks if s.offset == 0), b)

    def _chunks(self, step_budget: int, b: int) -> list[tuple[Seq, int]]:
        """Prompt chunks in a step of `step_budget` tokens beside `b` decodes (the cap
        shrinks with a paced budget, as in engine/scheduler.py)."""
        most = self.profile.max_num_batched_tokens
        cap = paced_cap(self.profile.max_prefill_chunk_tokens, step_budget, most)
        budget = step_budget - b
        chunks: list[tuple[Seq, int]] = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            n = prefill_chunk(seq.prompt - seq.offset, budget, cap)
            chunks.append((seq, n))
            budget -= n
        for i, (seq, n) in enumerate(chunks):  # top up the capped chunks, in order
            if budget <= 0:
                break
            more = min(seq.prompt - seq.offset - n, budget)
            if more > 0:
                chunks[i] = (seq, n + more)
                budget -= more
        return chunks

    # --- the planner's view -----------------------------------------------------------
    def tokens_by(self, now: float) -> int:
        """Output tokens produced by `now` (steps of the current epoch included)."""
        if self.phase is not Phase.EPOCH:
            return self.num_tokens_done
        t0, _, dt = self.epoch
        return self.num_tokens_done + len(self.decoding) * max(0, math.floor((now - t0) / dt))
