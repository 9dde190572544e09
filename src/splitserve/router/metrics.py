"""Prometheus metrics of a router, served at `GET /metrics` on its HTTP port.

prometheus-client, as on the workers (worker/metrics.py): the TTFT the router's
clients see, HTTP and gRPC (request received → first tokens, a histogram with vLLM's
`time_to_first_token_seconds` name under the `splitserve:router_` prefix), and, read at
scrape time, the forwarder's counters (requests, retries, refusals, degradations,
failures, cancellations), the completed requests by class and SLO outcome (slo.py:
goodput is the rate of outcome "met"), the requests open and the decode workers
serving and the size of the prefix index; per decode worker, the admission estimate's
state (router/admission.py): its line (fixed seconds and seconds a token of work), and by
priority class the prompt tokens in flight without a first token and the calibration
factor, so an operator can see why requests are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import fields

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.control.refusals import RefusalCounter
from splitserve.priority import PRIORITIES
from splitserve.router.forward import ForwardCounters, Forwarder
from splitserve.router.pool import Backend

PREFIX = "splitserve:router_"
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                  80.0, 160.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _State(Collector):
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def collect(self) -> Iterator[Metric]:
        counters = self.forwarder.counters
        family = CounterMetricFamily(f"{PREFIX}requests", "Requests by what became of them",
                                     labels=["outcome"])
        for field in fields(ForwardCounters):
            family.add_metric([field.name.removeprefix("num_")], getattr(counters, field.name))
        yield family
        slo = CounterMetricFamily(f"{PREFIX}slo_requests", "Completed requests by priority "
                                  "class and whether they met its TTFT and TPOT SLOs "
                                  "(met, ttft_missed, tpot_missed)",
                                  labels=["priority", "outcome"])
        for priority, outcome, count in self.forwarder.slo.rows():
            slo.add_metric([priority, outcome.value], count)
        yield slo
        pool = self.forwarder.pool
        for name, help_text, value in (
                ("requests_open", "Requests open through this router",
                 self.forwarder.num_in_flight),
                ("workers_serving", "Decode workers that get traffic", pool.num_eligible()),
                ("prefix_index_pages", "Page hashes in the prefix index", len(pool.index))):
            yield GaugeMetricFamily(f"{PREFIX}{name}", help_text, value=value)
        yield from _estimates(pool.backends.values())


def _estimates(backends: Iterable[Backend]) -> Iterator[Metric]:
    base = GaugeMetricFamily(f"{PREFIX}ttft_base_seconds", "Admission estimate: TTFT of a "
                             "one-token prompt on an idle worker", labels=["worker"])
    slope = GaugeMetricFamily(f"{PREFIX}ttft_seconds_per_token", "Admission estimate: "
                              "seconds a token of work adds to TTFT", labels=["worker"])
    pending = GaugeMetricFamily(f"{PREFIX}pending_prompt_tokens", "Prompt tokens sent to "
                                "the worker without a first token yet",
                                labels=["worker", "priority"])
    factor = GaugeMetricFamily(f"{PREFIX}ttft_calibration", "Admission estimate: the "
                               "class's 0.9 quantile of actual over estimated TTFT",
                               labels=["worker", "priority"])
    for backend in backends:
        model = backend.ttft
        if model.line is not None:
            base.add_metric([backend.worker_id], model.line.base_s)
            slope.add_metric([backend.worker_id], model.line.s_per_token)
        for priority, tokens, calibration in zip(PRIORITIES, model.pending,
                                                 model.calibration, strict=True):
            pending.add_metric([backend.worker_id, priority], tokens)
            factor.add_metric([backend.worker_id, priority], calibration.factor)
    yield from (base, slope, pending, factor)


class RouterMetrics:
    def __init__(self, forwarder: Forwarder, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds",
                              "Request received to first token, as the router's clients see it",
                              ["model_name"], buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.model_name = model_name
        self.refused = RefusalCounter(
            f"{PREFIX}auth_refusals", self.registry, "Calls refused by auth (HTTP 401/403, "
            "gRPC), by code (unauthenticated, permission_denied)")
        self.registry.register(_State(forwarder))
        forwarder.first_token_listeners.append(self.first_token)

    def first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
