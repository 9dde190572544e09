"""`splitserve planner --config planner.yaml`: the planner daemon. Wiring only.

Life cycle:
1. Load the config (an invalid one is refused with the field named, exit 1).
2. Connect to the broker (retrying while it is away), open the registry and the policy
   bucket, follow every worker's stats.
3. Serve gRPC: `splitserve.v1.Planner` (GetPlan, SetMode, History), health,
   reflection, and Prometheus `/metrics` on `metrics_address` (planner/metrics.py); log
   "planner ready"; under systemd, READY=1.
4. Every `interval_s`: a tick (planner/runner.py) — observe, lead or stand by, plan,
   act. A failed tick is logged and the next one starts afresh.
5. SIGTERM/SIGINT: STOPPING=1, the actuation in progress is cancelled (a role flip
   already asked for completes on the worker), workers the `local` actuator started are
   stopped (they drain), the lock is released so a standby leads at once, exit 0. The policy written stays in force: the cluster serves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from pathlib import Path

from splitserve.config.planner import PlannerConfig, load_planner_config
from splitserve.control.server import ServerSecurity
from splitserve.control.service_server import start_service_server
from splitserve.daemons.notify import Notifier
from splitserve.daemons.worker import configure_logging
from splitserve.planner.actuators import make_actuator
from splitserve.planner.metrics import PlannerMetrics
from splitserve.planner.observe import StatsBook
from splitserve.planner.runner import PlannerRunner
from splitserve.planner.service import planner_service
from splitserve.queue.connection import connect
from splitserve.queue.policy import PolicyStore
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings
from splitserve.queue.stats import StatsSubscription
from splitserve.redact import redact_url
from splitserve.tasks import STOP_DEADLINE_S, arm_stop_deadline, logged_task, stop_tasks

log = logging.getLogger(__name__)

BROKER_CONNECT_TIMEOUT_S = 30.0
LOCAL_STOP_S = 100.0  # planner/local.py: STOP_TIMEOUT_S per worker, stopped together


def run_planner(config_path: Path) -> None:
    config = load_planner_config(config_path)
    configure_logging(config.log_level)
    asyncio.run(serve(config))


def planner_id(config: PlannerConfig) -> str:
    return config.planner_id or f"planner-{socket.gethostname()}"


async def _follow_stats(subscription: StatsSubscription, book: StatsBook) -> None:
    async for stats in subscription:
        book.add(stats, time.monotonic())


async def _tick_forever(runner: PlannerRunner, interval_s: float) -> None:
    while True:
        await runner.tick()
        await asyncio.sleep(interval_s)


async def serve(config: PlannerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier.from_environ()
    me = planner_id(config)
    broker = await connect(config.nats_url, name=me, auth=config.nats_auth,
                           connect_timeout_s=BROKER_CONNECT_TIMEOUT_S)
    buckets = BucketSettings(replicas=config.nats.replicas)
    registry = await WorkerRegistry.open(broker.js, buckets)
    store = await PolicyStore.open(broker.js, buckets)
    book = StatsBook(config.stats_max_age_s)
    subscription = await StatsSubscription.subscribe(broker.nc)
    actuator = make_actuator(config.actuator, time.monotonic, book.role_of)
    runner = PlannerRunner(config, me, store, registry, broker.js, actuator, book)
    tasks = [logged_task(_follow_stats(subscription, book), "stats feed")]
    served = None
    metrics = PlannerMetrics(runner)
    try:
        served = await start_service_server(
            config.grpc_address, [planner_service(runner)],
            ServerSecurity(config.grpc_tls, config.auth, metrics.refused))
        if config.metrics_address:
            await metrics.serve(config.metrics_address)
        log.info("planner ready: %s, gRPC %s, mode %s, actuator %s, NATS %s", me,
                 served.address, runner.mode.value, actuator.kind,
                 redact_url(config.nats_url))
        notifier.ready(f"planning: {me}, gRPC {served.address}, mode {runner.mode.value}")
        tasks.append(logged_task(_tick_forever(runner, config.interval_s), "planner ticks"))
        await stop.wait()
        notifier.stopping("stopping")
        return 0
    finally:
        # the local actuator's workers drain before the planner exits
        local_s = LOCAL_STOP_S if config.actuator.kind == "local" else 0.0
        arm_stop_deadline("planner", STOP_DEADLINE_S + local_s)
        await stop_tasks(*tasks)
        await actuator.close()
        with contextlib.suppress(Exception):
            await runner.lock.release()
        await metrics.close()
        if served is not None:
            served.health.shutdown()
            await served.server.stop(1.0)
        await subscription.close()
        with contextlib.suppress(Exception):
            await registry.close()
        await broker.close()
        log.info("planner %s stopped after %d ticks (%d failed), %d policy writes", me,
                 runner.num_ticks, runner.num_tick_failures, runner.num_policy_writes)
        notifier.close()
