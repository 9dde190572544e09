"""Per-request output: stop conditions, incremental text, stop-string hold-back."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.sequence import FinishReason, Sequence
from splitserve.model.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a streaming chunk)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    first_scheduled_s: float | None = None  # monotonic; None: not prefilled here (remote)


class OutputTracker:
    """Checks a sequence's stop conditions and yields its text in safe deltas.

    With stop strings set, the last `len(longest stop) - 1` characters are held back
    until they can no longer start a stop string, so a stop string is never streamed.
    """

    def __init__(
        self, seq: Sequence, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.seq = seq
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer else None
        self._text = ""
        self._num_emitted = 0
        stops = seq.params.stop
        self._holdback = max((len(s) for s in stops), default=1) - 1
        self._eos = set() if seq.params.ignore_eos else set(eos_token_ids)
        self._stop_ids = set(seq.params.stop_token_ids)

    def append(self, token_id: int) -> RequestOutput:
        """Record a sampled token (already appended to the sequence) and check stops."""
        seq = self.seq
        reason: FinishReason | None = None
        if self._detok is not None:
            self._text += self._detok.push(token_id)
            reason = self._check_stop_strings()
        if reason is None and (token_id in self._eos or token_id in self._stop_ids):
            reason = FinishReason.STOP
        if reason is None and seq.num_output_tokens >= seq.params.max_tokens:
            reason = FinishReason.LENGTH
        seq.finish_reason = reason
        return self._emit([token_id], reason)

    def abort(self) -> RequestOutput:
        self.seq.finish_reason = FinishReason.ABORT
        return self._emit([], FinishReason.ABORT)

    def _check_stop_strings(self) -> FinishReason | None:
        for stop in self.seq.params.stop:
            start = max(0, self._num_emitted - len(stop))
            at = self._text.find(stop, start)
            if at != -1:
                self._text = self._text[:at]
                return FinishReason.STOP
        return None

    def _emit(self, token_ids: list[int], reason: FinishReason | None) -> RequestOutput:
        end = len(self._text) if reason is not None else max(
            self._num_emitted, len(self._text) - self._holdback)
        delta = self._text[self._num_emitted : end]
        self._num_emitted = end
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            text_delta=delta,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            first_scheduled_s=seq.first_scheduled_s,
        )

    @property
    def text(self) -> str:
        return self._text
