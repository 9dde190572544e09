"""`splitserve router --config router.yaml`: the front door in front of the decode workers.

Life cycle:
1. Load the config and the model's tokenizer (no weights).
2. Connect to the broker, open the registry, follow it, the decode workers' stats,
   their prefix-cache events (pool.py) and the `router` key of splitserve-policy
   (live cost weights and QoS limits, policy_watch.py).
3. Serve HTTP (OpenAI API, http_api.py) and gRPC (Generation forwarded, grpc_api.py);
   log "router ready" with both addresses; under systemd, READY=1.
4. SIGTERM/SIGINT: health NOT_SERVING, STOPPING=1; open requests get `drain_grace_s`
   to finish while new connections are refused; then everything closes. Exit 0.
The router holds no request state beyond the open calls: several may run side by side
and a restarted one loses only the requests it had open (their clients see the
connection drop and the workers free the pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from splitserve.client import ClientSecurity
from splitserve.config.router import RouterConfig, RouterPolicy, load_router_config
from splitserve.control.server import ServerSecurity
from splitserve.daemons.notify import Notifier
from splitserve.daemons.worker import configure_logging
from splitserve.model.loader import default_model_path, load_tokenizer
from splitserve.queue.connection import connect
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings
from splitserve.redact import redact_url
from splitserve.router.forward import Forwarder, ForwardSettings
from splitserve.router.grpc_api import start_router_grpc
from splitserve.router.http_api import HttpApi
from splitserve.router.policy_watch import RouterPolicyWatch
from splitserve.router.pool import DecodePool
from splitserve.tasks import STOP_DEADLINE_S, arm_stop_deadline, logged_task, stop_tasks

log = logging.getLogger(__name__)

BROKER_CONNECT_TIMEOUT_S = 30.0


def run_router(config_path: Path) -> None:
    config = load_router_config(config_path)
    configure_logging(config.log_level)
    asyncio.run(serve(config))


def model_name(config: RouterConfig) -> str:
    return config.model_name() or default_model_path().stem


def _ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    if not config.grpc_tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.grpc_tls.cert_file, config.grpc_tls.key_file)
    if config.grpc_tls.client_ca_file:
        context.load_verify_locations(config.grpc_tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(config: RouterConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier.from_environ()
    tokenizer = await asyncio.to_thread(load_tokenizer, config.model or None)
    workers = config.workers
    security = ClientSecurity.from_files(workers.ca_file, workers.cert_file, workers.key_file,
                                         workers.token_file)
    pool = DecodePool(security, stats_max_age_s=config.stats_max_age_s,
                      unavailable_backoff_s=config.unavailable_backoff_s,
                      weights=config.weights, balance=config.balance,
                      keepalive_s=config.keepalive_s,
                      keepalive_timeout_s=config.keepalive_timeout_s)
    forwarder = Forwarder(pool, security, ForwardSettings(
        config.request_timeout_s, config.connect_timeout_s, config.qos))
    broker = await connect(config.nats_url, name="splitserve-router", auth=config.nats_auth,
                           connect_timeout_s=BROKER_CONNECT_TIMEOUT_S)
    buckets = BucketSettings(replicas=config.nats.replicas)
    registry = await WorkerRegistry.open(broker.js, buckets)

    def apply_policy(policy: RouterPolicy) -> None:
        pool.weights = policy.weights
        forwarder.settings = replace(forwarder.settings, qos=policy.qos)

    policy = RouterPolicyWatch(config.policy(), apply_policy)
    feeds = [logged_task(pool.follow_registry(registry, broker), "registry watch"),
             logged_task(policy.run(broker, buckets), "router policy watch"),
             logged_task(pool.follow_stats(broker), "stats feed"),
             logged_task(pool.follow_kv_events(broker), "KV events feed")]
    http = HttpApi(forwarder, tokenizer, model_name(config), config.auth)
    runner = web.AppRunner(http.app(config.max_body_bytes), handler_cancellation=True,
                           shutdown_timeout=config.drain_grace_s, access_log=None)
    grpc_server = health = None
    try:
        await runner.setup()
        host, port = config.http_address.rsplit(":", 1)
        site = web.TCPSite(runner, host, int(port), ssl_context=_ssl_context(config))
        await site.start()
        http_address = "{}:{}".format(*runner.addresses[0][:2])
        grpc_address = "-"
        if config.grpc_address:
            server_security = ServerSecurity(config.grpc_tls, config.auth,
                                             http.metrics.refused)
            grpc_server, health, grpc_address = await start_router_grpc(
                config.grpc_address, forwarder, server_security)
        scheme = "https" if config.grpc_tls.enabled else "http"
        log.info("router ready: HTTP %s://%s/v1 (model %s), gRPC %s, NATS %s", scheme,
                 http_address, http.model_name, grpc_address, redact_url(config.nats_url))
        notifier.ready(f"serving: HTTP {http_address}, gRPC {grpc_address}")
        await stop.wait()
        log.info("router: draining (grace %.0f s)", config.drain_grace_s)
        notifier.stopping(f"draining (grace {config.drain_grace_s:.0f} s)")
        if health is not None:
            health.set_serving(False)
        return 0
    finally:
        # Both fronts drain at once, within the grace; past it and STOP_DEADLINE_S more,
        # the stacks go to the log and the process exits 70 (tasks.py).
        arm_stop_deadline("router", config.drain_grace_s + STOP_DEADLINE_S)
        # each refuses new requests and waits for the open ones
        await asyncio.gather(runner.cleanup(), *(
            [grpc_server.stop(config.drain_grace_s)] if grpc_server is not None else []))
        await stop_tasks(*feeds)
        await pool.close()
        with contextlib.suppress(Exception):
            await registry.close()
        await broker.close()
        log.info("router stopped: %s", forwarder.counters)
        notifier.close()
