"""Sampling parameters and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.engine.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable filtering.

    seed: same seed and prompt → same tokens. None draws a random seed per request.
    stop_token_ids end the output (the token is kept, like EOS); stop strings end it
    and are cut from the text.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature",
                                 f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest("stop_token_ids", f"stop token id {token_id} is outside "
                                     f"the vocabulary (0..{vocab_size - 1})")
        if any(s == "" for s in self.stop):
            raise InvalidRequest("stop", "stop strings must not be empty")
