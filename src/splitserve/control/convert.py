"""Protobuf ⇄ ingress types for the Generation service, with wire-level validation.

Checks here are the ones only the wire format can get wrong (bytes that are no
GenerateRequest, which prompt field is set, list sizes, the priority class); value
ranges (max_tokens >= 1, top_p in (0, 1], context length...) are the engine's, so
they read the same on every path. Every check here is O(1) or bounded by a small
cap before any per-element work: this runs on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampling import SamplingParams
from splitserve.engine.sequence import FinishReason
from splitserve.ingress import GenerateRequest, GenerationChunk
from splitserve.priority import DEFAULT_PRIORITY, PRIORITIES
from splitserve.rpc import generation_pb2 as pb

DEFAULT_MAX_TOKENS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # the detokenizer holds back len(longest stop) - 1 characters
MAX_STOP_TOKEN_IDS = 256
# Checked before the ids are copied: copying and validating 8M ids costs ~0.9 s of
# event-loop time. 128k tokens is past any context length served here; the engine's
# own context-length check still applies below this cap.
MAX_PROMPT_TOKENS = 1 << 17

# Field number → name of GenerateRequest's string fields, to name one with bad UTF-8.
_STRING_FIELDS = {f.number: f.name for f in pb.GenerateRequest.DESCRIPTOR.fields
                  if f.type == f.TYPE_STRING}

_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


@dataclass(frozen=True)
class UndecodableRequest:
    """What `parse_generate_request` returns for bytes that are no GenerateRequest:
    the servicer answers it with INVALID_ARGUMENT (grpc itself would say UNKNOWN)."""

    field: str  # the string field with bad UTF-8, or "request"
    message: str

    def error(self) -> InvalidRequest:
        return InvalidRequest(self.field, self.message)


def parse_generate_request(data: bytes) -> pb.GenerateRequest | UndecodableRequest:
    """The Generate handler's request deserializer; never raises."""
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as exc:
        field = _bad_utf8_field(data)
        if field is not None:
            return UndecodableRequest(field, f"{field} is not valid UTF-8")
        # upb says "Error parsing message with type '...': <reason>"
        reason = str(exc).rpartition(": ")[2] or "cannot parse"
        return UndecodableRequest("request", f"request is not a valid "
                                  f"{pb.GenerateRequest.DESCRIPTOR.full_name}: {reason}")


def request_from_proto(msg: pb.GenerateRequest, request_id: str) -> GenerateRequest:
    """The ingress request for `msg`; raises InvalidRequest for malformed wire input."""
    num_ids = len(msg.token_ids)  # O(1): no copy yet
    has_text, has_ids = msg.HasField("text"), num_ids > 0
    if has_text == has_ids:
        raise InvalidRequest("text", "set exactly one of text and token_ids "
                             f"(got {'both' if has_text else 'neither'})")
    if num_ids > MAX_PROMPT_TOKENS:
        raise InvalidRequest("token_ids", f"token_ids holds {num_ids} tokens; the limit is "
                             f"{MAX_PROMPT_TOKENS}")
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
    if priority not in PRIORITIES:
        shown = priority if len(priority) <= 32 else f"{priority[:32]}..."
        raise InvalidRequest("priority", f"unknown priority {shown!r}; known classes: "
                             f"{', '.join(PRIORITIES)} (empty: {DEFAULT_PRIORITY})")
    return priority


def _bad_utf8_field(data: bytes) -> str | None:
    """The first top-level string field of `data` that is not UTF-8; None if there is
    none or the wire format itself is corrupt."""
    pos, end = 0, len(data)
    while 0 <= pos < end:
        key, pos = _varint(data, pos)
        if pos < 0:
            return None
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:  # fixed64
            pos += 8
        elif wire_type == 5:  # fixed32
            pos += 4
        elif wire_type == 2:  # length-delimited
            size, pos = _varint(data, pos)
            if pos < 0 or pos + size > end:
                return None
            if number in _STRING_FIELDS:
                try:
                    data[pos:pos + size].decode("utf-8")
                except UnicodeDecodeError:
                    return _STRING_FIELDS[number]
            pos += size
        else:  # groups: not in this message
            return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; (0, -1) when truncated."""
    value, shift = 0, 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return 0, -1


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
