"""The offload decision: prefill this prompt here, or on a prefill worker?

Seed policy (ARCHITECTURE.md step 2): offload when the uncached part of the prompt
is long and the prefill queue has room, or when this decode worker is busy and the
prompt is moderately long. Thresholds come from config and are retuned live.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.errors import ConfigError

# Bounds of RoutingConfig's integer fields. A length threshold past any context length
# served (~128k tokens) already means "never by length"; a queue bound past the stream's
# max_ack_pending (1024) means "unbounded"; every remote attempt costs a lease (seconds),
# so more than 16 only delays the local fallback.
_INT_BOUNDS: tuple[tuple[str, int, int], ...] = (
    ("prefill_length_threshold", 0, 1 << 24),
    ("moderate_length_threshold", 0, 1 << 24),
    ("prefill_queue_max", 0, 1 << 16),
    ("moderate_queue_max", 0, 1 << 16),
    ("max_remote_attempts", 1, 16),
    ("low_priority_queue_max", 0, 1 << 16),
)


@dataclass(frozen=True)
class RoutingConfig:
    """Thresholds of the seed policy.

    - prefill_length_threshold: uncached prompt tokens from which a prompt always goes
      remote (while the queue has room). On 2 CPU cores SmolLM2 prefills ~700 tokens/s,
      so 128 tokens is ~0.2 s of stalled decode steps if kept local.
    - moderate_length_threshold: when decode is busy (load ≥ decode_load_threshold),
      prompts from this length go remote too, but only while the prefill queue holds
      fewer than moderate_queue_max jobs: a short prompt queued behind a long one
      would wait seconds for a prefill that costs the decode worker ~0.1 s.
    - prefill_queue_max: jobs waiting in the prefill queue beyond which prompts stay local.
    - decode_load_threshold: running sequences / max_num_seqs from which decode counts
      as busy. On one CPU core a 64-token local prefill adds ~150 ms to a ~110 ms
      16-sequence decode step, so CPU deployments may set it to 0 (always busy).
    - max_remote_attempts: remote attempts per request; after a failed attempt (lease
      ran out, prefill worker gone) a new one is published while attempts remain, a
      prefill worker is registered and this policy still says remote, else the
      prompt is prefilled locally. 1: always fall back locally at once.
    - low_priority_queue_max: graceful degradation: a low-priority prompt goes remote
      only while fewer jobs than this are queued (default 1: only to an idle pool; 0:
      never), so a busy prefill pool serves the other classes first.
    - enable_remote_prefill: false makes this worker colocated (everything local).
    """

    enable_remote_prefill: bool = True
    prefill_length_threshold: int = 128
    moderate_length_threshold: int = 48
    prefill_queue_max: int = 16
    moderate_queue_max: int = 1
    decode_load_threshold: float = 0.5
    max_remote_attempts: int = 2
    low_priority_queue_max: int = 1

    def __post_init__(self) -> None:
        for name, low, high in _INT_BOUNDS:
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"routing.{name}", f"must be >= {low}, got {value!r}")
            if value > high:
                raise ConfigError(f"routing.{name}", f"must be <= {high}, got {value!r}")
        if not 0.0 <= self.decode_load_threshold <= 1.0:  # NaN fails too
            raise ConfigError("routing.decode_load_threshold",
                              f"must be in [0, 1], got {self.decode_load_threshold}")


def should_offload_prefill(
    config: RoutingConfig,
    effective_len: int,
    prefill_queue_depth: int,
    decode_load: float,
    priority: str = "normal",
) -> bool:
    """effective_len = prompt tokens not in the prefix cache; prefill_queue_depth =
    jobs queued or in progress; decode_load in [0, 1]."""
    if not config.enable_remote_prefill:
        return False
    if priority == "low" and prefill_queue_depth >= config.low_priority_queue_max:
        return False  # the pool is busy: it serves the other classes first
    if effective_len >= config.prefill_length_threshold:
        return prefill_queue_depth < config.prefill_queue_max
    return (decode_load >= config.decode_load_threshold
            and effective_len >= config.moderate_length_threshold
            and prefill_queue_depth < min(config.moderate_queue_max, config.prefill_queue_max))


@dataclass(frozen=True)
class OffloadRule:
    """`should_offload_prefill` with one moment's inputs captured on the event loop
    (the policy, the queue depth, whether a usable prefill worker is registered), for
    the engine thread to complete at admission with the count of this worker's remote
    prefills not yet landed. Prompts admitted in the same step see each other's
    decisions through that count: the captured depth predates them (it lags by the
    admission call, the broker's by up to a poll), so a moderate prompt admitted with
    a long one could follow it to the prefill worker and wait behind its chunks."""

    routing: RoutingConfig
    queue_depth: int
    usable: bool
    priority: str = "normal"

    def __call__(self, effective_len: int, decode_load: float, num_remote_pending: int) -> bool:
        depth = max(self.queue_depth, num_remote_pending)
        return self.usable and should_offload_prefill(self.routing, effective_len, depth,
                                                      decode_load, self.priority)
