"""Prometheus metrics of the planner daemon, served at `/metrics` on `metrics_address`.

prometheus-client, as on the workers and the router; the exposition is built on the
planner's event loop (an aiohttp handler), so the collector reads the runner's last
tick record and counters on the thread that writes them. Names carry the
`splitserve:planner_` prefix (vLLM has no planner):

- `ticks_total`, `tick_failures_total`, `policy_writes_total`, `actuations_total`,
  `actuation_failures_total` (counters);
- `leader` (1 while this planner holds the lock), `mode{mode}` (1 for the mode in force),
  `unresponsive_workers` (registered, silent past `stats_max_age_s`: planned without);
- `workers{role}` (serving now), `target_workers{role}` (the last plan; absent without
  one), `threshold{name}` (the routing thresholds in force).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.control.refusals import RefusalCounter
from splitserve.planner.model import Mode, Role
from splitserve.planner.runner import PlannerRunner

log = logging.getLogger(__name__)

PREFIX = "splitserve:planner_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RunnerCollector(Collector):
    def __init__(self, runner: PlannerRunner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        runner, last = self.runner, self.runner.last
        for name, doc, value in (
                ("ticks", "Planner ticks run", runner.num_ticks),
                ("tick_failures", "Ticks failed (broker errors); the next starts afresh",
                 runner.num_tick_failures),
                ("policy_writes", "Threshold writes to the routing key", runner.num_policy_writes),
                ("actuations", "Actuations done (flips, unit starts/stops, local workers)",
                 runner.actuator.num_actions),
                ("actuation_failures", "Actuations failed (retried with backoff)",
                 runner.actuator.num_failures)):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield GaugeMetricFamily(PREFIX + "leader", "1 while this planner holds the lock",
                                value=float(last.leader))
        yield GaugeMetricFamily(PREFIX + "unresponsive_workers", "Registered workers without "
                                "stats past stats_max_age_s, left out of the plan",
                                value=len(runner.unresponsive))
        mode = GaugeMetricFamily(PREFIX + "mode", "1 for the mode in force", labels=["mode"])
        for m in Mode:
            mode.add_metric([m.value], float(runner.mode is m))
        yield mode
        workers = GaugeMetricFamily(PREFIX + "workers", "Workers serving each role at the "
                                    "last tick", labels=["role"])
        for role in Role:
            workers.add_metric([role.value], last.current.get(role, 0))
        yield workers
        if last.plan is not None:
            target = GaugeMetricFamily(PREFIX + "target_workers", "Workers of each role the "
                                       "last plan wants", labels=["role"])
            for role in Role:
                target.add_metric([role.value], last.plan.count(role))
            yield target
        if last.thresholds_in_force is not None:
            thresholds = GaugeMetricFamily(PREFIX + "threshold", "Routing thresholds in force "
                                           "(file routing with the policy bucket over it)",
                                           labels=["name"])
            for name, value in dataclasses.asdict(last.thresholds_in_force).items():
                thresholds.add_metric([name], value)
            yield thresholds


class PlannerMetrics:
    def __init__(self, runner: PlannerRunner) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_RunnerCollector(runner))
        self.refused = RefusalCounter(PREFIX + "auth_refusals", self.registry)
        self._site_runner: web.AppRunner | None = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def _get(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def serve(self, address: str) -> str:
        """Serve `/metrics` on `host:port` (port 0: any free one); returns the URL."""
        app = web.Application()
        app.router.add_get("/metrics", self._get)
        self._site_runner = web.AppRunner(app, access_log=None)
        await self._site_runner.setup()
        host, _, port = address.rpartition(":")
        site = web.TCPSite(self._site_runner, host, int(port))
        await site.start()
        bound = self._site_runner.addresses[0][1]
        url = f"http://{host}:{bound}/metrics"
        log.info("metrics on %s", url)
        return url

    async def close(self) -> None:
        if self._site_runner is not None:
            await self._site_runner.cleanup()
