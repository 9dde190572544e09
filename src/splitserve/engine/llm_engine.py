"""The inference engine: one step is schedule → run → postprocess.

Single-threaded by design: callers (the CLI, a daemon's loop) own the thread that
calls `step()`; nothing here blocks on I/O.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq

import torch

from splitserve.config.schema import EngineConfig
from splitserve.engine.attention_backend import make_attention
from splitserve.engine.errors import (
    CapacityExceeded,
    DuplicateRequest,
    InvalidRequest,
    QueueFull,
)
from splitserve.engine.kv_pool import KVPool, PageGeometry, dtype_from_name
from splitserve.engine.output import OutputTracker, RequestOutput
from splitserve.engine.page_allocator import PageAllocator, page_hashes
from splitserve.engine.remote_prefill import AcceptRefusal, LandingPlan, RemotePrefills
from splitserve.engine.runner import ModelRunner
from splitserve.engine.sampler import skip_draw
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.scheduler import ScheduledSequence, Scheduler
from splitserve.engine.sequence import Sequence
from splitserve.engine.stats import EngineInfo, EngineStats, StepStats
from splitserve.model.loader import LoadedModel, load_model
from splitserve.priority import PRIORITIES, class_rank

log = logging.getLogger(__name__)

# (the KV pool tensor, landing page ids) -> all intact? Runs on the engine thread.
PoolVerifier = Callable[[torch.Tensor, list[int]], bool]


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        mc = loaded.config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        self.geometry = PageGeometry(config.page_size, mc.num_layers, mc.num_kv_heads,
                                     mc.head_dim, dtype_from_name(config.dtype))
        num_pages = config.num_pages or KVPool.num_pages_for_budget(
            self.geometry, config.kv_cache_memory_mb << 20)
        device = loaded.model.embed_tokens.weight.device
        self.pool = KVPool(self.geometry, num_pages, device)
        if config.kv_prefault == "sync":
            self.pool.prefault()
        elif config.kv_prefault == "background":
            threading.Thread(target=self.pool.prefault, name="kv-prefault", daemon=True).start()
        self.allocator = PageAllocator(num_pages, config.page_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   config.max_prefill_chunk_tokens,
                                   [config.tpot_slo_s.get(name) for name in PRIORITIES])
        attention = make_attention(config.attention_backend, self.pool, mc.head_dim**-0.5)
        self.runner = ModelRunner(loaded.model, attention)
        self.remote = RemotePrefills(self.allocator, self.scheduler, self._copy_page)
        self.scheduler.release_hook = self.remote.release_landing
        self._trackers: dict[str, OutputTracker] = {}
        self._held: dict[str, Sequence] = {}  # finished prefills whose pages await transfer
        self.num_steps = 0
        self.in_step = False  # a step's forward is running (mid-step commands see True)
        self.last_step = StepStats()
        self.info = EngineInfo(config, config.page_size, num_pages, config.max_num_seqs,
                               self.max_model_len, mc.vocab_size, loaded.fingerprint,
                               config.dtype, self.pool.nbytes // num_pages)
        log.info("engine ready: model %s (%s) on %s, %s attention, %d pages of %d tokens "
                 "(%.0f MiB KV)", loaded.source, loaded.fingerprint, device,
                 type(attention).__name__, num_pages, config.page_size, self.pool.nbytes / 2**20)

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        from pathlib import Path

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_model(config.model, dtype_from_name(config.dtype),
                            Path(config.cache_dir) if config.cache_dir else None, device)
        return cls(loaded, config)

    # --- requests -------------------------------------------------------------------
    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        """Raise InvalidRequest / CapacityExceeded for a request that must not be admitted."""
        if len(prompt_token_ids) == 0:
            raise InvalidRequest("prompt", "prompt is empty")
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest("prompt_token_ids",
                                 f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        params.validate(vocab)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                "max_tokens", f"prompt ({len(prompt_token_ids)} tokens) + max_tokens "
                f"({params.max_tokens}) = {total} exceeds the context length "
                f"({self.max_model_len})")

    def add_request(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
        hold_pages: bool = False, priority: str = "normal",
    ) -> Sequence:
        """Queue a request (ahead of lower `priority` classes: scheduler.py). With
        `hold_pages` its pages outlive it until `release_held`."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.hold_pages = hold_pages
        seq.rank = class_rank(priority)
        self.scheduler.add(seq)
        log.debug("request %s admitted: %d prompt tokens", request_id, len(prompt_token_ids))
        return seq

    def _new_sequence(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams
    ) -> Sequence:
        if request_id in self._trackers or request_id in self._held:
            raise DuplicateRequest(request_id)
        self.validate(prompt_token_ids, params)
        queued = len(self.scheduler.waiting) + self.remote.num_pending
        if queued >= self.config.max_num_waiting:
            raise QueueFull(request_id, f"{queued} requests are waiting for a prefill here, "
                            "the limit (engine.max_num_waiting); retry later or elsewhere")
        num_pages = -(-(len(prompt_token_ids) + params.max_tokens) // self.config.page_size)
        if num_pages > self.allocator.num_pages:
            raise CapacityExceeded(request_id, f"request needs {num_pages} KV pages, this "
                                   f"worker has {self.allocator.num_pages}")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       torch.Generator().manual_seed(seed), time.monotonic())
        self._trackers[request_id] = OutputTracker(seq, self.tokenizer,
                                                   self.loaded.config.eos_token_ids)
        return seq

    # --- remote prefill (see remote_prefill.py) ------------------------------------------
    def reserve_remote(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams,
        attempt: int, release_at: float, priority: str = "normal",
    ) -> LandingPlan | None:
        """Landing pages for a remote prefill, or None if the pool has no room now."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.rank = class_rank(priority)
        plan = self.remote.reserve(seq, attempt, release_at)
        if plan is None:
            del self._trackers[request_id]
        return plan

    def accept_remote(self, request_id: str, attempt: int, first_token: int,
                      verify: PoolVerifier | None = None) -> RequestOutput | AcceptRefusal:
        """The prompt's KV has landed: start decoding after `first_token`, or say why
        not (the attempt then stays pending: the caller retries or falls back).
        `verify(pool tensor, landing page ids)` checks the landed pages first."""
        vocab = self.loaded.config.vocab_size
        if self.remote.plan(request_id) is None:
            return AcceptRefusal.STALE
        if not 0 <= first_token < vocab:
            return AcceptRefusal.BAD_FIRST_TOKEN
        pool = self.pool.tensor
        seq = self.remote.accept(request_id, attempt,
                                 None if verify is None else lambda ids: verify(pool, ids))
        if isinstance(seq, AcceptRefusal):
            return seq
        if not seq.params.greedy:  # the prefill worker drew the first token from the seed
            skip_draw(seq.generator, vocab)
        return self._append_token(seq, first_token, time.monotonic())

    def retry_remote(self, request_id: str, attempt: int, release_at: float
                     ) -> LandingPlan | None:
        """A new remote attempt on fresh landing pages; None: queued for local prefill
        instead (no room for the pages) or unknown request."""
        return self.remote.retry(request_id, attempt, release_at)

    def extend_remote(self, request_id: str, attempt: int, release_at: float) -> bool:
        """A renewed lease moves the pending attempt's page release to `release_at`."""
        return self.remote.extend(request_id, attempt, release_at)

    def fallback_remote(self, request_id: str) -> bool:
        """No KVReady in time: prefill locally instead (the landing pages stay fenced)."""
        return self.remote.fallback(request_id) is not None

    def held_pages(self, request_id: str) -> list[int]:
        return list(self._held[request_id].page_ids)

    def release_held(self, request_id: str) -> None:
        seq = self._held.pop(request_id, None)
        if seq is not None:
            self.scheduler.release_pages(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        tracker = self._trackers.pop(request_id, None)
        if tracker is None:
            return None
        if self.remote.abort(request_id) is None:
            self.scheduler.finish(tracker.seq)
        return tracker.abort()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def cached_prefix_tokens(self, prompt_token_ids: Seq[int]) -> int:
        """Prompt tokens the prefix cache holds now (whole pages; never the last token)."""
        if not self.config.enable_prefix_cache:
            return 0
        ps = self.config.page_size
        hashes = page_hashes(list(prompt_token_ids[:-1]), ps)
        return self.allocator.count_cached_prefix(hashes) * ps

    def record_kv_events(self) -> None:
        """From now on, snapshots taken with `take_kv_events` carry the prefix cache's
        changes (EngineStats.kv_events); the caller must take them regularly."""
        self.allocator.record_events = True

    def stats(self, take_kv_events: bool = False) -> EngineStats:
        """A snapshot of the engine's state (call it on the engine's thread)."""
        alloc, sched = self.allocator, self.scheduler
        return EngineStats(
            taken_s=time.monotonic(), num_steps=self.num_steps, num_running=len(sched.running),
            num_waiting=len(sched.waiting), num_remote_pending=self.remote.num_pending,
            num_held=len(self._held), num_pages_used=alloc.num_used_pages,
            num_pages_free=alloc.num_free_pages,
            num_pages_quarantined=alloc.num_quarantined_pages,
            num_pages_cached=alloc.num_cached_pages, num_pages_total=alloc.num_pages,
            max_num_seqs=sched.max_num_seqs, num_preemptions=sched.num_preemptions,
            last_step=self.last_step,
            kv_events=alloc.take_events() if take_kv_events else ())

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started_s = time.monotonic()
        self.allocator.release_quarantined(started_s)
        plan = self.scheduler.schedule(started_s)
        for preempted in plan.preempted:
            log.info("request %s preempted (%s); it will be recomputed",
                     preempted.seq.request_id, preempted.reason.value)
        if not plan.scheduled:
            return []
        work = _step_work(plan.scheduled)  # before `update` advances the sequences
        self.in_step = True
        try:
            sampled = self.runner.run(plan.scheduled)
        finally:
            self.in_step = False
        self.scheduler.update(plan.scheduled)
        self.num_steps += 1
        outputs = self._postprocess(plan.scheduled, sampled)
        duration_s = time.monotonic() - started_s
        self.scheduler.pace.observe(plan.num_tokens, duration_s)
        self.last_step = StepStats(*work, num_preempted=len(plan.preempted),
                                   duration_s=duration_s, token_budget=plan.budget)
        return outputs

    def _postprocess(self, scheduled, sampled) -> list[RequestOutput]:  # type: ignore[no-untyped-def]
        now = time.monotonic()
        return [self._append_token(item.seq, token_id, now)
                for item, token_id in zip(scheduled, sampled) if token_id is not None]

    def _append_token(self, seq: Sequence, token_id: int, now: float) -> RequestOutput:
        seq.token_ids.append(token_id)
        if seq.first_token_s is None:
            seq.first_token_s = now
        out = self._trackers[seq.request_id].append(token_id)
        if out.finished:
            self.scheduler.finish(seq, keep_pages=seq.hold_pages)
            if seq.hold_pages:
                self._held[seq.request_id] = seq
            del self._trackers[seq.request_id]
        return out

    def _copy_page(self, src: int, dst: int) -> None:
        self.pool.tensor[dst].copy_(self.pool.tensor[src])

    # --- conveniences -----------------------------------------------------------------
    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion together; return each one's output token ids."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        seqs = [self.add_request(f"gen-{id(self)}-{i}", p, sp)
                for i, (p, sp) in enumerate(zip(prompts, per_prompt))]
        while self.has_unfinished:
            self.step()
        return [s.output_token_ids for s in seqs]

    def stream(self, request_id: str, prompt_token_ids: Seq[int],
               params: SamplingParams) -> Iterator[RequestOutput]:
        """Run one request alone (with anything else queued) and yield its chunks."""
        self.add_request(request_id, prompt_token_ids, params)
        while True:
            for out in self.step():
                if out.request_id == request_id:
                    yield out
                    if out.finished:
                        return


def _step_work(scheduled: Seq[ScheduledSequence]) -> tuple[int, int, int]:
    """(prefill tokens, decode tokens, decode context tokens) of a step's batch."""
    prefill = decode = context = 0
    for item in scheduled:
        seq = item.seq
        if seq.num_computed_tokens >= seq.num_prompt_tokens:  # one generated token
            decode += 1
            context += seq.num_computed_tokens + item.num_new_tokens
        else:
            prefill += item.num_new_tokens
    return prefill, decode, context
