"""The error → status code table, and the server's own start-up errors."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_fixtures import GrpcWorker

from splitserve.control.errors import BindError, Draining
from splitserve.control.server import start_grpc_server
from splitserve.control.status import status_for
from splitserve.engine.async_engine import EngineStopped
from splitserve.engine.errors import CapacityExceeded, DuplicateRequest, InvalidRequest
from splitserve.errors import ConfigError
from splitserve.queue.errors import BrokerUnavailable, InvalidSubjectToken, PublishFailed

pytestmark = pytest.mark.timeout(30)

Code = grpc.StatusCode


@pytest.mark.parametrize(("exc", "code", "field", "message"), [
    (InvalidRequest("top_p", "top_p must be in (0, 1], got 2"), Code.INVALID_ARGUMENT, "top_p",
     "top_p must be in (0, 1], got 2"),
    (InvalidRequest("text", "set exactly one"), Code.INVALID_ARGUMENT, "text",
     "text: set exactly one"),
    (DuplicateRequest("r1"), Code.ALREADY_EXISTS, "request_id",
     "request id 'r1' is already running"),
    (ConfigError("routing.threshold", "must be >= 0"), Code.INVALID_ARGUMENT,
     "routing.threshold", "routing.threshold: must be >= 0"),
    (InvalidSubjectToken("priority", "a.b", "no dots"), Code.INVALID_ARGUMENT, "priority",
     "invalid priority 'a.b': no dots"),
    (CapacityExceeded("r1", "request needs 9 KV pages,\n this worker has 8"),
     Code.RESOURCE_EXHAUSTED, None, "request needs 9 KV pages, this worker has 8"),
    (Draining("r1"), Code.UNAVAILABLE, None, "worker is draining"),
    (EngineStopped("engine is not running"), Code.UNAVAILABLE, None, "engine is not running"),
    (BrokerUnavailable(["nats://x:4222"], 2.0), Code.UNAVAILABLE, None, "no NATS broker"),
    (PublishFailed("r1", 1, "s", "timeout"), Code.UNAVAILABLE, None,
     "request r1 attempt 1: publish to s failed"),
    (TimeoutError(), Code.DEADLINE_EXCEEDED, None, "deadline exceeded"),
])
def test_known_errors_map_to_their_codes(exc: Exception, code: grpc.StatusCode,
                                         field: str | None, message: str) -> None:
    status = status_for(exc, "r1")
    assert (status.code, status.field) == (code, field)
    assert status.message.startswith(message)
    assert "\n" not in status.message
    metadata = dict(status.trailing_metadata("r1"))
    assert metadata.get("splitserve-field") == field
    assert metadata["splitserve-request-id"] == "r1"


def test_unexpected_error_is_internal_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="splitserve.control.status"):
        status = status_for(KeyError("page 7"), "req-9")
    assert status.code == Code.INTERNAL
    assert status.message == "internal error (request req-9): KeyError; see the worker log"
    (record,) = caplog.records
    assert "req-9" in record.getMessage() and record.exc_info is not None


@pytest.mark.slow
async def test_port_in_use_is_a_bind_error(grpc_worker: GrpcWorker) -> None:
    with pytest.raises(BindError, match=f"cannot listen on {grpc_worker.address}"):
        await start_grpc_server(grpc_worker.address, None, grpc_worker.admin)
