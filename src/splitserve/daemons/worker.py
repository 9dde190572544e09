"""`splitserve decode|prefill --config F`: one worker daemon. Wiring only.

Start-up: engine → gRPC (reflection + health, NOT_SERVING) → NIXL registration,
NATS, descriptor in `splitserve-workers` → role → health SERVING.
SIGTERM/SIGINT: health NOT_SERVING, drain (in-flight work finishes within
`drain_grace_s`), deregister, exit 0.
Engine thread crash: health NOT_SERVING at once, no drain (the engine cannot finish
anything), stop the role, deregister, exit 1 so that systemd restarts the worker.
SIGHUP, a change of the config file (watched from the start) and Admin.Reload:
reload the config (config/reload.py); the reloadable fields apply at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from splitserve.config.daemon import (
    RELOADABLE_WORKER_FIELDS,
    WorkerConfig,
    config_hash,
    load_worker_config,
)
from splitserve.config.reload import ConfigReloader
from splitserve.config.watch import ChangeDetector, watch_file
from splitserve.control.server import ServerSecurity, start_grpc_server
from splitserve.redact import redact_url
from splitserve.worker.admin import WorkerAdminBackend
from splitserve.worker.core import WorkerCore, logged_task
from splitserve.worker.decode import DecodeService
from splitserve.worker.prefill import PrefillService

log = logging.getLogger(__name__)

ENGINE_CRASH_EXIT_CODE = 1  # non-zero: systemd's Restart=on-failure starts a fresh worker


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("nats", "NIXL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_worker(config_path: Path, role: str) -> None:
    # Until serve() handles SIGHUP, its default action would kill the loading worker; a
    # file changed meanwhile is still reloaded (the detector dates from before the load).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    changes = ChangeDetector(config_path)
    config = load_worker_config(config_path, role)
    configure_logging(config.log_level)
    exit_code = asyncio.run(serve(config, config_hash(config_path), changes))
    if exit_code:
        raise SystemExit(exit_code)


async def serve(config: WorkerConfig, cfg_hash: str = "",
                changes: ChangeDetector | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT or the engine thread dies; with `changes`
    (its config file), reload it on SIGHUP and whenever the file changes.

    Returns the process exit code: 0 after a signal, 1 after an engine crash.
    """
    core = WorkerCore(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloader, watcher = None, None
    if changes is not None:
        reloader = _reloader(core, changes.path, cfg_hash)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        watcher = logged_task(watch_file(changes, lambda: reloader.reload("file change")),
                              "config watcher")
    engine = await core.start_engine()
    role: DecodeService | PrefillService = (
        DecodeService(core) if config.role == "decode" else PrefillService(core))
    admin = WorkerAdminBackend(core, role, reloader, cfg_hash)
    # NOT_SERVING until the broker and the registry are reached
    server = await start_grpc_server(
        config.grpc_address, role if isinstance(role, DecodeService) else None, admin,
        serving=False, security=ServerSecurity(config.grpc_tls, config.auth))
    try:
        await core.start_messaging(server.address)
        await role.start()
        server.set_serving(True)
        log.info("worker %s ready: role %s, gRPC %s, NATS %s", core.worker_id, config.role,
                 server.address, redact_url(config.nats_url))
        await _first_set(stop, engine.crashed)
        if engine.crashed.is_set():
            server.set_serving(False)  # the finally below stops and deregisters
            log.error("worker %s: engine thread died (%r); stopping without a drain, "
                      "exit code %d", core.worker_id, engine.error, ENGINE_CRASH_EXIT_CODE)
            return ENGINE_CRASH_EXIT_CODE
        grace_s = core.config.drain_grace_s  # reloadable
        log.info("worker %s: draining (grace %.0f s)", core.worker_id, grace_s)
        await server.drain(grace_s)  # health NOT_SERVING, in-flight finish
        return 0
    finally:
        if watcher is not None:
            watcher.cancel()
        await role.stop()
        await server.stop(grace_s=1.0)
        await core.stop()
        log.info("worker %s stopped", core.worker_id)


async def _first_set(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _reloader(core: WorkerCore, path: Path, cfg_hash: str) -> ConfigReloader[WorkerConfig]:
    def load(p: Path) -> WorkerConfig:
        return load_worker_config(p, core.role)

    def apply(config: WorkerConfig) -> None:
        logging.getLogger().setLevel(config.log_level)
        core.apply_config(config)

    return ConfigReloader(path, load, core.config, reloadable=RELOADABLE_WORKER_FIELDS,
                          apply=apply, config_hash_value=cfg_hash)
