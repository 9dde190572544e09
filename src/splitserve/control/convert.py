"""Protobuf ⇄ ingress types for the Generation service, with wire-level validation.

Checks here are the ones only the wire format can get wrong (which prompt field is
set, list sizes, the priority token); value ranges (max_tokens >= 1, top_p in
(0, 1], context length...) are the engine's, so they read the same on every path.
"""

from __future__ import annotations

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import FinishReason
from splitserve.queue.errors import InvalidSubjectToken
from splitserve.queue.subjects import validate_priority
from splitserve.rpc import generation_pb2 as pb
from splitserve.worker.ingress import GenerateRequest, GenerationChunk

DEFAULT_MAX_TOKENS = 64
DEFAULT_PRIORITY = "normal"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # the detokenizer holds back len(longest stop) - 1 characters
MAX_STOP_TOKEN_IDS = 256

_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def request_from_proto(msg: pb.GenerateRequest, request_id: str) -> GenerateRequest:
    """The ingress request for `msg`; raises InvalidRequest for malformed wire input."""
    has_text, has_ids = msg.HasField("text"), len(msg.token_ids) > 0
    if has_text == has_ids:
        raise InvalidRequest("text", "set exactly one of text and token_ids "
                             f"(got {'both' if has_text else 'neither'})")
    return GenerateRequest(
        prompt=msg.text if has_text else None,
        prompt_token_ids=tuple(msg.token_ids) if has_ids else None,
        chat=msg.chat,
        params=sampling_from_proto(msg),
        priority=_priority(msg.priority),
        request_id=request_id,
    )


def sampling_from_proto(msg: pb.GenerateRequest) -> SamplingParams:
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got "
                             f"{len(msg.stop)}")
    longest = max((len(s) for s in msg.stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequest("stop", f"stop strings must be at most {MAX_STOP_CHARS} "
                             f"characters, got one of {longest}")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} stop token "
                             f"ids, got {len(msg.stop_token_ids)}")
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        stop=tuple(msg.stop),
        ignore_eos=msg.ignore_eos,
    )


def _priority(priority: str) -> str:
    if not priority:
        return DEFAULT_PRIORITY
    try:
        return validate_priority(priority)
    except InvalidSubjectToken as exc:
        raise InvalidRequest("priority", str(exc)) from exc


def chunk_to_proto(chunk: GenerationChunk) -> pb.GenerateChunk:
    out = chunk.output
    msg = pb.GenerateChunk(request_id=chunk.request_id, token_ids=chunk.token_ids,
                           text=chunk.text, finish_reason=_FINISH_REASONS[out.finish_reason])
    if chunk.timing is not None:
        t = chunk.timing
        msg.timing.CopyFrom(pb.GenerateChunk.Timing(
            queue_ms=t.queue_ms, ttft_ms=t.ttft_ms, total_ms=t.total_ms, prefill=t.prefill,
            num_attempts=t.num_attempts, num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens, num_output_tokens=out.num_output_tokens))
    return msg
