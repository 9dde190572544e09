"""The offload decision: prefill this prompt here, or on a prefill worker?

Seed policy (ARCHITECTURE.md step 2): offload when the uncached part of the prompt
is long and the prefill queue has room, or when this decode worker is busy and the
prompt is moderately long. Thresholds come from config and are retuned live.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.errors import ConfigError


@dataclass(frozen=True)
class RoutingConfig:
    """Thresholds of the seed policy.

    - prefill_length_threshold: uncached prompt tokens from which a prompt always goes
      remote (while the queue has room). On 2 CPU cores SmolLM2 prefills ~700 tokens/s,
      so 128 tokens is ~0.2 s of stalled decode steps if kept local.
    - moderate_length_threshold: when decode is busy (load ≥ decode_load_threshold),
      prompts from this length go remote too.
    - prefill_queue_max: jobs waiting in the prefill queue beyond which prompts stay local.
    - enable_remote_prefill: false makes this worker colocated (everything local).
    """

    enable_remote_prefill: bool = True
    prefill_length_threshold: int = 128
    moderate_length_threshold: int = 48
    prefill_queue_max: int = 16
    decode_load_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("prefill_length_threshold", "moderate_length_threshold",
                     "prefill_queue_max"):
            if getattr(self, name) < 0:
                raise ConfigError(f"routing.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.decode_load_threshold <= 1.0:
            raise ConfigError("routing.decode_load_threshold",
                              f"must be in [0, 1], got {self.decode_load_threshold}")


def should_offload_prefill(
    config: RoutingConfig,
    effective_len: int,
    prefill_queue_depth: int,
    decode_load: float,
    priority: str = "normal",
) -> bool:
    """effective_len = prompt tokens not in the prefix cache; decode_load in [0, 1]."""
    del priority  # every class follows the same thresholds in the seed policy
    if not config.enable_remote_prefill or prefill_queue_depth >= config.prefill_queue_max:
        return False
    if effective_len >= config.prefill_length_threshold:
        return True
    return (decode_load >= config.decode_load_threshold
            and effective_len >= config.moderate_length_threshold)
