"""The auth-refusals counter that every daemon's /metrics carries: one series per refusal
code (unauthenticated, permission_denied), present from 0 so that a rate is defined
before the first refusal. Called with the gRPC status code of each refused call
(`ServerSecurity.on_refusal`; the router's HTTP layer maps 401/403 onto the same codes).
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter

from splitserve.control.auth import REFUSAL_CODES, refusal_label

DOCUMENTATION = "Calls refused by auth, by code (unauthenticated, permission_denied)"


class RefusalCounter:
    """`name`_total{**labels, code} in `registry`; `counter(code)` counts one refusal."""

    def __init__(self, name: str, registry: CollectorRegistry, documentation: str = DOCUMENTATION,
                 **labels: str) -> None:
        self._labels = labels
        self._counter = Counter(name, documentation, (*labels, "code"), registry=registry)
        for code in REFUSAL_CODES:
            self._counter.labels(**labels, code=refusal_label(code))

    def __call__(self, code: grpc.StatusCode) -> None:
        self._counter.labels(**self._labels, code=refusal_label(code)).inc()
