"""Wire-level input: undecodable bytes, request ids, priorities, prompt length caps."""

from __future__ import annotations

import pytest

from splitserve.control.convert import (
    MAX_PROMPT_TOKENS,
    UndecodableRequest,
    parse_generate_request,
    request_from_proto,
)
from splitserve.control.status import status_for
from splitserve.engine.errors import InvalidRequest
from splitserve.engine.sampling import SamplingParams
from splitserve.ingress import GenerateRequest, check_request_id, prepare_prompt
from splitserve.rpc import generation_pb2 as pb

BAD_UTF8 = b"\xc3\x28"  # a 2-byte lead followed by a non-continuation byte


def field_bytes(number: int, payload: bytes) -> bytes:
    """One length-delimited field (payload shorter than 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


# --- undecodable requests ------------------------------------------------------------
@pytest.mark.parametrize(("data", "field"), [
    (field_bytes(1, BAD_UTF8), "text"),
    (field_bytes(1, b"ok") + field_bytes(12, b"\xff"), "priority"),
    (field_bytes(1, b"ok") + field_bytes(10, b"fine") + field_bytes(10, BAD_UTF8), "stop"),
    (field_bytes(13, b"id-\xe9"), "request_id"),  # latin-1 "é": not UTF-8
    # a varint field, a fixed32 field (top_p) and bad UTF-8 after them
    (b"\x20\x05" + b"\x35\x00\x00\x80\x3f" + field_bytes(1, BAD_UTF8), "text"),
])
def test_bad_utf8_names_the_string_field(data: bytes, field: str) -> None:
    parsed = parse_generate_request(data)
    assert parsed == UndecodableRequest(field, f"{field} is not valid UTF-8")
    status = status_for(parsed.error())
    assert (status.code.name, status.field) == ("INVALID_ARGUMENT", field)
    assert status.message == f"{field} is not valid UTF-8"


@pytest.mark.parametrize("data", [
    b"\x0a\x05ab",  # length past the end
    b"\x0a",  # truncated length
    b"\xff\xff\xff",  # truncated key varint
])
def test_corrupt_wire_format_is_an_invalid_request(data: bytes) -> None:
    parsed = parse_generate_request(data)
    assert isinstance(parsed, UndecodableRequest)
    assert parsed.field == "request"
    assert parsed.message.startswith("request is not a valid splitserve.v1.GenerateRequest: ")


def test_valid_bytes_parse_to_the_message() -> None:
    msg = pb.GenerateRequest(text="héllo", priority="high", stop=["ü"], request_id="r-1")
    assert parse_generate_request(msg.SerializeToString()) == msg


# --- request ids ---------------------------------------------------------------------
@pytest.mark.parametrize("request_id", ["é-1", "r\u00a0x", "ключ", "a\x7fb", "tab\tx", "a b",
                                        "a.b", "a:b", "x" * 129])
def test_request_ids_outside_printable_ascii_are_invalid(request_id: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        check_request_id(request_id)
    assert err.value.field == "request_id"
    assert err.value.message == ("request_id must be at most 128 printable ASCII characters "
                                 "without spaces, '.', '*', '>' or ':'")


@pytest.mark.parametrize("request_id", ["r-1", "!~#$%&'()+,-/;<=?@[]^_`{|}", "x" * 128])
def test_printable_ascii_request_ids_pass(request_id: str) -> None:
    assert check_request_id(request_id) == request_id


def test_empty_request_id_gets_a_new_one() -> None:
    assert len(check_request_id("")) == 32


# --- priorities ----------------------------------------------------------------------
@pytest.mark.parametrize(("priority", "expected"), [("", "normal"), ("high", "high"),
                                                    ("normal", "normal"), ("low", "low")])
def test_known_priorities(priority: str, expected: str) -> None:
    msg = pb.GenerateRequest(text="hi", priority=priority)
    assert request_from_proto(msg, "r").priority == expected


@pytest.mark.parametrize("priority", ["urgent", "HIGH", "batch", "x" * 1000])
def test_unknown_priority_is_invalid_and_lists_the_classes(priority: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        request_from_proto(pb.GenerateRequest(text="hi", priority=priority), "r")
    assert err.value.field == "priority"
    assert err.value.message.endswith("; known classes: high, normal, low (empty: normal)")
    assert len(err.value.message) < 150  # a long token is cut in the message


# --- prompt length cap ---------------------------------------------------------------
def test_prompt_at_the_token_cap_converts() -> None:
    msg = pb.GenerateRequest(token_ids=[1] * MAX_PROMPT_TOKENS)
    request = request_from_proto(msg, "r")
    assert request.prompt_token_ids is not None
    assert len(request.prompt_token_ids) == MAX_PROMPT_TOKENS


def test_8m_token_prompt_is_refused_before_it_is_copied() -> None:
    """Before the cap this cost ~0.9 s of event-loop time; now it is len() (O(1))."""
    msg = pb.GenerateRequest(token_ids=[1] * (8 << 20))
    with pytest.raises(InvalidRequest) as err:
        request_from_proto(msg, "r")
    assert err.value.field == "token_ids"
    assert err.value.message == (f"token_ids holds {8 << 20} tokens; the limit is "
                                 f"{MAX_PROMPT_TOKENS}")


# --- prepare_prompt ------------------------------------------------------------------
def test_prepare_prompt_tokenizes_then_validates_with_the_params() -> None:
    seen = []
    params = SamplingParams(max_tokens=3)
    request = GenerateRequest(prompt_token_ids=(5, 6, 7), params=params)

    prompt = prepare_prompt(None, lambda p, sp: seen.append((p, sp)), request)  # type: ignore[arg-type]

    assert prompt == [5, 6, 7]
    assert seen == [([5, 6, 7], params)]


def test_prepare_prompt_raises_the_engines_validation_error(tiny_engine) -> None:
    engine = tiny_engine()
    request = GenerateRequest(prompt_token_ids=(1, 512))
    with pytest.raises(InvalidRequest) as err:
        prepare_prompt(None, engine.validate, request)  # type: ignore[arg-type]
    assert err.value.field == "prompt_token_ids"
    assert not engine.has_unfinished


def test_prepare_prompt_refuses_a_malformed_request_before_validating() -> None:
    def validate(prompt: list[int], params: SamplingParams) -> None:
        raise AssertionError("validate must not run")

    with pytest.raises(InvalidRequest) as err:
        prepare_prompt(None, validate, GenerateRequest(prompt=""))  # type: ignore[arg-type]
    assert err.value.field == "prompt"
