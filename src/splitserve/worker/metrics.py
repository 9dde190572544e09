"""Prometheus metrics of one worker daemon, served on `metrics_address` at `/metrics`.

Built on prometheus-client (the reference Python client: thread-safe metric types,
the text exposition format, a small HTTP server on its own thread). Where vLLM has
an equivalent metric the name is vLLM's with a `splitserve:` prefix instead of
`vllm:`, and the same `model_name` label, so vLLM dashboards port over by changing
the prefix (configs/grafana-dashboard.json is one).

Two kinds of metrics:
- events, observed where they happen on the event loop (`RequestMetrics`):
  histograms of TTFT, inter-token latency, end-to-end latency, queue time, prefill
  time by path (local/remote) and KV transfer bytes and time; token and finished
  request counters;
- state, read at scrape time (`_StateCollector`): gauges from the engine's latest
  `EngineStats` snapshot (running, waiting, KV pages by state, queue depth) and the
  worker's cumulative counters (offload decisions, attempts, fallbacks, expired
  leases, rejects, the failure counters of Admin/GetStatus). A snapshot is immutable
  and counters are plain ints, so the HTTP thread reads them without a lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.control.refusals import RefusalCounter
from splitserve.engine.stats import EngineStats

log = logging.getLogger(__name__)

PREFIX = "splitserve:"
PREFILL_PATHS = ("local", "remote", "job")  # decode: local / remote; prefill worker: job
# vLLM's request-latency buckets (seconds), extended for CPU prefill of long prompts
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
TRANSFER_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0)
BYTES_BUCKETS = tuple(float(64 << (10 + 2 * i)) for i in range(9))  # 64 KiB .. 4 GiB

# WorkerCounters field → (metric name without prefix and _total, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "num_local_prefills": ("local_prefills", "Prompts prefilled in this engine"),
    "num_remote_prefills": ("remote_prefills", "Remote prefills landed (prefill: written)"),
    "num_offload_local": ("offload_decisions_local", "Requests the offload rule kept local"),
    "num_offload_remote": ("offload_decisions_remote", "Requests sent to the prefill pool"),
    "num_remote_attempts": ("remote_attempts", "Prefill jobs published (attempts)"),
    "num_fallbacks": ("remote_fallbacks", "Failed remote attempts (retried or local)"),
    "num_lease_expiries": ("lease_expiries", "Decode: attempts whose lease ran out"),
    "num_expired_jobs": ("expired_jobs", "Prefill: jobs terminated, lease over"),
    "num_lease_renewals": ("lease_renewals", "Lease extensions granted"),
    "num_declined_jobs": ("declined_jobs", "Jobs declined up front (would not finish)"),
    "num_rejects": ("requests_rejected", "Requests refused before admission"),
    "num_stale_notifications": ("stale_notifications", "KVReady no longer awaited"),
    "num_incarnation_mismatches": ("incarnation_mismatches", "For another incarnation"),
    "num_checksum_failures": ("checksum_failures", "Landed pages that failed checksums"),
    "num_duplicate_ids": ("duplicate_request_ids", "Caller request ids already in flight"),
    "num_duplicate_publishes": ("duplicate_publishes", "Jobs the broker already had"),
    "num_accept_failures": ("accept_failures", "KVReady that could not be accepted"),
    "num_rejected_jobs": ("rejected_jobs", "Prefill: jobs terminated, permanent error"),
    "num_clock_skew_jobs": ("clock_skew_jobs", "Prefill: jobs refused, clock behind"),
    "num_role_switches": ("role_switches", "Role switches (Admin.SetRole) completed"),
}


@dataclass(frozen=True)
class WorkerState:
    """What the state collector reads at scrape time."""

    engine: EngineStats
    counters: dict[str, int]  # COUNTERS' fields
    remote_queue_depth: int  # decode: prefill jobs queued on the broker (0 elsewhere)
    num_transfers: int
    num_transfer_failures: int
    role: str = ""  # "decode" or "prefill": Admin.SetRole may switch it


class RequestMetrics:
    """The event metrics of one worker, in its own registry."""

    def __init__(self, model_name: str, state: Callable[[], WorkerState]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name

        def hist(name: str, doc: str, buckets: tuple[float, ...],
                 labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(PREFIX + name, doc, ("model_name", *labels),
                             buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, ("model_name", *labels), registry=self.registry)

        m = model_name
        self.ttft = hist("time_to_first_token_seconds", "Time to first token (admission "
                         "to first token)", LATENCY_BUCKETS_S).labels(m)
        self.itl = hist("inter_token_latency_seconds", "Time between two output tokens "
                        "of a request", ITL_BUCKETS_S).labels(m)
        self.e2e = hist("e2e_request_latency_seconds", "Admission to last token",
                        LATENCY_BUCKETS_S).labels(m)
        self.queue = hist("request_queue_time_seconds", "Admission to the start of "
                          "prefill (local: first scheduled; remote: job dequeued)",
                          LATENCY_BUCKETS_S).labels(m)
        self._prefill = hist("request_prefill_time_seconds", "Start of prefill to first "
                             "token, by path (remote: prefill + transfer + notification)",
                             LATENCY_BUCKETS_S, ("path",))
        self.transfer_bytes = hist("kv_transfer_bytes", "Prefill: bytes of KV written per "
                                   "job", BYTES_BUCKETS).labels(m)
        self.transfer_time = hist("kv_transfer_seconds", "Prefill: time of one job's KV "
                                  "write, post to completion", TRANSFER_BUCKETS_S).labels(m)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished "
                                     "requests").labels(m)
        self.generation_tokens = counter("generation_tokens", "Generated tokens").labels(m)
        self._success = counter("request_success", "Finished requests by finish reason",
                                ("finished_reason",))
        self.refused = RefusalCounter(PREFIX + "auth_refusals", self.registry,
                                      model_name=model_name)
        for path in PREFILL_PATHS:  # known label values start at 0, not absent
            self.prefill_time(path)
        self.registry.register(_StateCollector(model_name, state))

    def prefill_time(self, path: str) -> Histogram:
        return self._prefill.labels(self.model_name, path)

    def finished(self, reason: str, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self._success.labels(self.model_name, reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)

    def serve(self, address: str) -> str:
        """Serve `/metrics` on `host:port` (port 0: any free one) from a daemon
        thread; returns the URL."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "0.0.0.0",
                                            registry=self.registry)
        url = f"http://{host or '0.0.0.0'}:{server.server_port}/metrics"
        log.info("metrics on %s", url)
        return url


class _StateCollector(Collector):
    def __init__(self, model_name: str, state: Callable[[], WorkerState]) -> None:
        self.model_name = model_name
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s, m = self.state(), self.model_name
        e = s.engine

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([m], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([m], value)
            return c

        yield gauge("num_requests_running", "Sequences in the engine's batch", e.num_running)
        yield gauge("num_requests_waiting", "Admitted, prefill not started or not landed "
                    "(local waiting + remote pending)", e.queue_depth)
        yield gauge("kv_cache_usage_perc", "Share of KV pages used or quarantined (0-1)",
                    e.kv_usage)
        pages = GaugeMetricFamily(PREFIX + "kv_pages", "KV pages by state",
                                  labels=["model_name", "state"])
        for state, value in (("used", e.num_pages_used), ("free", e.num_pages_free),
                             ("quarantined", e.num_pages_quarantined),
                             ("cached", e.num_pages_cached)):
            pages.add_metric([m, state], value)
        yield pages
        yield gauge("remote_queue_depth", "Prefill jobs queued on the broker, as this "
                    "decode worker last saw them", s.remote_queue_depth)
        yield counter("num_preemptions", "Sequences preempted for lack of pages",
                      e.num_preemptions)
        yield counter("engine_steps", "Engine steps run", e.num_steps)
        yield gauge("engine_step_token_budget", "Tokens the last step could compute "
                    "(below max_num_batched_tokens while its prompt chunks were trimmed "
                    "to keep a decoding class's TPOT SLO)", e.last_step.token_budget)
        yield counter("kv_transfers", "KV writes completed", s.num_transfers)
        yield counter("kv_transfer_failures", "KV writes failed", s.num_transfer_failures)
        if s.role:
            role = GaugeMetricFamily(PREFIX + "worker_role", "1 for the role this worker "
                                     "serves now (Admin.SetRole switches it)",
                                     labels=["model_name", "role"])
            for name in ("decode", "prefill"):
                role.add_metric([m, name], float(s.role == name))
            yield role
        for field, (name, doc) in COUNTERS.items():
            yield counter(name, doc, s.counters.get(field, 0))
