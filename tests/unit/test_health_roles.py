"""HealthStatus: a gated service disabled on its own (a worker's role serves no Generate)."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from splitserve.control.health import HealthStatus

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GEN, ADMIN = "splitserve.v1.Generation", "splitserve.v1.Admin"


def statuses(health: HealthStatus) -> tuple[int, int, int]:
    return health._status[""], health._status[GEN], health._status[ADMIN]


def test_disabled_service_stays_not_serving_across_drain_and_resume() -> None:
    health = HealthStatus([GEN], [ADMIN], serving=False)
    health.set_enabled(GEN, False)  # a prefill worker starting
    assert statuses(health) == (NOT_SERVING, NOT_SERVING, SERVING)
    health.set_serving(True)
    assert statuses(health) == (SERVING, NOT_SERVING, SERVING)
    health.set_serving(False)
    health.set_serving(True)
    assert statuses(health) == (SERVING, NOT_SERVING, SERVING)
    health.set_enabled(GEN, True)  # switched to decode
    assert statuses(health) == (SERVING, SERVING, SERVING)
    health.set_serving(False)  # draining: the enabled gated service follows
    assert statuses(health) == (NOT_SERVING, NOT_SERVING, SERVING)
    health.shutdown()
    health.set_enabled(GEN, True)
    health.set_serving(True)
    assert statuses(health) == (NOT_SERVING, NOT_SERVING, NOT_SERVING)


@pytest.mark.parametrize("service", ["", ADMIN, "nope"])
def test_only_gated_services_can_be_disabled(service: str) -> None:
    with pytest.raises(ValueError, match="not a gated service"):
        HealthStatus([GEN], [ADMIN]).set_enabled(service, False)
