"""`splitserve decode|prefill --config F`: one worker daemon. Wiring only.

Start-up: engine → gRPC (reflection + health, NOT_SERVING) → NIXL registration,
NATS, descriptor in `splitserve-workers` → role → health SERVING.
SIGTERM/SIGINT: health NOT_SERVING, drain (in-flight work finishes within
`drain_grace_s`), deregister, exit 0.
Engine thread crash: health NOT_SERVING at once, no drain (the engine cannot finish
anything), stop the role, deregister, exit 1 so that systemd restarts the worker.
SIGHUP, a change of the config file (watched from the start) and Admin.Reload:
reload the config (config/reload.py); the reloadable fields apply at once.
Admin.SetRole switches the role in place (worker/role_switch.py); the file's role
names the daemon, the switched role stays in force across reloads.
Under systemd (daemons/notify.py): READY=1 once SERVING, RELOADING=1 … READY=1 around
each reload after that, STOPPING=1 when the drain (or the crash exit) begins, STATUS=
lines throughout; with WatchdogSec=, WATCHDOG=1 every half interval while the engine
thread answers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

from splitserve.config.daemon import (
    RELOADABLE_WORKER_FIELDS,
    WorkerConfig,
    config_hash,
    load_worker_config,
)
from splitserve.config.reload import ConfigReloader, ReloadResult
from splitserve.config.watch import ChangeDetector, watch_file
from splitserve.control.server import ServerSecurity, start_grpc_server
from splitserve.daemons.notify import EngineProbe, Notifier, run_watchdog, watchdog_period_s
from splitserve.redact import redact_url
from splitserve.tasks import arm_stop_deadline, first_set, logged_task, stop_tasks
from splitserve.worker.admin import WorkerAdminBackend
from splitserve.worker.core import WorkerCore, start_core
from splitserve.worker.role_switch import RoleSwitcher

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
    notifier = Notifier.from_environ()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # while the engine loads, a SIGHUP must not end the process (its default action)
    loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP while starting: ignored")
    core = await start_core(config)
    engine = core.engine
    reloader, watcher, watchdog = None, None, None
    if changes is not None:
        reloader = _reloader(core, changes.path, cfg_hash, notifier)
        loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
        watcher = logged_task(watch_file(changes, lambda: reloader.reload("file change")),
                              "config watcher")
    role = RoleSwitcher(core)  # the decode or prefill role, switched by Admin.SetRole
    admin = WorkerAdminBackend(core, role, reloader, cfg_hash)
    # NOT_SERVING until the broker and the registry are reached
    server = await start_grpc_server(
        config.grpc_address, role, admin, serving=False,
        security=ServerSecurity(config.grpc_tls, config.auth, core.metrics.refused))
    server.set_generation_enabled(core.role == "decode")
    role.listeners.append(lambda change: notifier.status(
        f"serving: {change.role} worker {core.worker_id}, gRPC {server.address}; role "
        f"switch {change.previous_role} → {change.role}: {change.outcome.value}"))
    try:
        await core.start_messaging(server.address)
        await role.start()
        server.set_serving(True)
        log.info("worker %s ready: role %s, gRPC %s, NATS %s", core.worker_id, config.role,
                 server.address, redact_url(config.nats_url))
        notifier.ready(f"serving: {config.role} worker {core.worker_id}, gRPC {server.address}")
        period_s = watchdog_period_s()
        if period_s is not None:
            watchdog = logged_task(run_watchdog(notifier, period_s, EngineProbe(engine)),
                                   "systemd watchdog")
        await first_set(stop, engine.crashed)
        if engine.crashed.is_set():
            server.set_serving(False)  # the finally below stops and deregisters
            log.error("worker %s: engine thread died (%r); stopping without a drain, "
                      "exit code %d", core.worker_id, engine.error, ENGINE_CRASH_EXIT_CODE)
            notifier.stopping(f"engine crashed ({type(engine.error).__name__}); exiting "
                              f"with {ENGINE_CRASH_EXIT_CODE}")
            return ENGINE_CRASH_EXIT_CODE
        # Reloadable, bounded by MAX_DRAIN_GRACE_S (config/daemon.py) so that the drain
        # and the stop after it end within the units' TimeoutStopSec (systemd/).
        grace_s = core.config.drain_grace_s
        log.info("worker %s: draining (grace %.0f s)", core.worker_id, grace_s)
        notifier.stopping(f"draining (grace {grace_s:.0f} s)")
        await server.drain(grace_s)  # health NOT_SERVING, in-flight finish
        return 0
    finally:
        arm_stop_deadline(f"worker {core.worker_id}")  # exits 70 if the rest hangs
        await stop_tasks(watcher, watchdog)
        await role.stop()
        await server.stop(grace_s=1.0)
        await core.stop()
        log.info("worker %s stopped", core.worker_id)
        notifier.close()


def _reloader(core: WorkerCore, path: Path, cfg_hash: str,
              notifier: Notifier) -> ConfigReloader[WorkerConfig]:
    daemon_role = core.role  # `splitserve decode|prefill`: what the file must say

    def load(p: Path) -> WorkerConfig:
        # Checked against the daemon's role; a switch since then (SetRole) stays.
        return replace(load_worker_config(p, daemon_role), role=core.role)  # type: ignore[arg-type]

    def apply(config: WorkerConfig) -> None:
        logging.getLogger().setLevel(config.log_level)
        core.apply_config(config)

    return _NotifyingReloader(path, load, core.config, reloadable=RELOADABLE_WORKER_FIELDS,
                              apply=apply, config_hash_value=cfg_hash, notifier=notifier)


class _NotifyingReloader(ConfigReloader[WorkerConfig]):
    """Tells systemd about each reload once the worker is serving: RELOADING=1 (with
    MONOTONIC_USEC) before it, READY=1 with the outcome in STATUS after it. A reload
    while starting or draining says nothing (READY=1 then would be a lie)."""

    def __init__(self, *args: Any, notifier: Notifier, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notifier = notifier

    def reload(self, trigger: str) -> ReloadResult:
        if self.notifier.state != "ready":
            return super().reload(trigger)
        self.notifier.reloading(f"reloading config ({trigger})")
        result = super().reload(trigger)  # never raises
        outcome = (f"refused ({result.error})" if result.error
                   else f"config {result.config_hash}")
        self.notifier.ready(f"serving; last reload ({trigger}): {outcome}")
        return result
