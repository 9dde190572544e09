"""A request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from splitserve.engine.sampling import SamplingParams
from splitserve.priority import DEFAULT_PRIORITY, class_rank


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller


@dataclass
class Sequence:
    """Token ids are the prompt followed by the generated tokens.

    `num_computed_tokens` tokens already have K/V in `page_ids`; the next step
    computes tokens [num_computed_tokens, num_tokens). A sequence in decode has
    exactly one uncomputed token: the last one sampled.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator
    arrival_s: float
    status: SequenceStatus = SequenceStatus.WAITING
    page_ids: list[int] = field(default_factory=list)
    page_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_cached_pages_published: int = 0
    num_preemptions: int = 0
    hold_pages: bool = False  # keep pages after finishing (prefill for transfer)
    finish_reason: FinishReason | None = None
    first_scheduled_s: float | None = None  # first admitted to a step (local prefill)
    first_token_s: float | None = None
    rank: int = class_rank(DEFAULT_PRIORITY)  # 0 high, 1 normal, 2 low (splitserve.priority)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
