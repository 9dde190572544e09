"""What the engine says about itself: the one boundary between its thread and the rest.

The engine is single-threaded; nothing outside `engine/` may read its scheduler or
page allocator (another thread would race with a step). Instead:
- `EngineInfo`: facts fixed at start-up (page size, pool size, model fingerprint,
  limits), safe to read from any thread;
- `EngineStats`: an immutable snapshot taken on the engine thread after every step
  and after every batch of commands (a request added, a remote prefill reserved...).
  `AsyncEngine.stats` holds the latest one on the event loop; `AsyncEngine.call`
  runs anything else on the engine thread.

Queue depth has one definition here: requests admitted that have no first token yet
and are not being prefilled, local (`num_waiting`) or remote (`num_remote_pending`).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.config.schema import EngineConfig


@dataclass(frozen=True)
class EngineInfo:
    """Fixed for the engine's life."""

    config: EngineConfig
    page_size: int
    num_pages: int
    max_num_seqs: int
    max_model_len: int
    vocab_size: int
    fingerprint: str  # the model's weights and shapes
    dtype: str  # KV dtype
    page_nbytes: int  # one page, all layers, K and V


@dataclass(frozen=True)
class StepStats:
    """One `Engine.step()`: what it computed and how long it took."""

    num_prefill_tokens: int = 0  # prompt tokens computed (chunks of prompts)
    num_decode_tokens: int = 0  # sequences that advanced by one generated token
    num_context_tokens: int = 0  # K/V the decode sequences attended to, summed
    num_preempted: int = 0
    duration_s: float = 0.0
    token_budget: int = 0  # the most it could take (below the maximum while paced)


@dataclass(frozen=True)
class EngineStats:
    """The engine's state at one moment, taken on its thread."""

    taken_s: float  # time.monotonic() when taken
    num_steps: int  # steps run so far (the snapshot after step N says N)
    num_running: int
    num_waiting: int  # local prefill not started (includes preempted sequences)
    num_remote_pending: int  # landing pages reserved, KVReady not accepted yet
    num_held: int  # prefills finished whose pages await a transfer (prefill role)
    num_pages_used: int
    num_pages_free: int
    num_pages_quarantined: int
    num_pages_cached: int  # pages holding a cached prefix (in use or reusable)
    num_pages_total: int
    max_num_seqs: int
    num_preemptions: int  # since start
    last_step: StepStats = StepStats()
    # Prefix-cache changes since the previous snapshot AsyncEngine delivered, in order:
    # (True, page hash) cached, (False, page hash) no longer. Only delivered snapshots
    # carry them (`Engine.stats(take_kv_events=True)`), so each change arrives once.
    kv_events: tuple[tuple[bool, bytes], ...] = ()

    @property
    def queue_depth(self) -> int:
        """Admitted, waiting for a prefill to start or to land."""
        return self.num_waiting + self.num_remote_pending

    @property
    def num_unfinished(self) -> int:
        """Requests the engine still has work or pages for."""
        return self.num_running + self.num_waiting + self.num_remote_pending

    @property
    def decode_load(self) -> float:
        """Running sequences / max_num_seqs."""
        return self.num_running / self.max_num_seqs if self.max_num_seqs else 0.0

    @property
    def kv_usage(self) -> float:
        """Share of pages neither free nor reusable (used + quarantined)."""
        busy = self.num_pages_used + self.num_pages_quarantined
        return busy / self.num_pages_total if self.num_pages_total else 0.0


# Before the engine exists (a metrics scrape during start-up).
EMPTY_STATS = EngineStats(taken_s=0.0, num_steps=0, num_running=0, num_waiting=0,
                          num_remote_pending=0, num_held=0, num_pages_used=0,
                          num_pages_free=0, num_pages_quarantined=0, num_pages_cached=0,
                          num_pages_total=0, max_num_seqs=0, num_preemptions=0)
