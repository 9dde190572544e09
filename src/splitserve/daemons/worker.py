"""`splitserve decode|prefill --config F`: one worker daemon. Wiring only.

Start-up: engine → gRPC (reflection + health, NOT_SERVING) → NIXL registration,
NATS, descriptor in `splitserve-workers` → role → health SERVING.
SIGTERM/SIGINT: health NOT_SERVING, drain (in-flight work finishes within
`drain_grace_s`), deregister, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from splitserve.config.daemon import WorkerConfig, config_hash, load_worker_config
from splitserve.control.server import start_grpc_server
from splitserve.worker.admin import WorkerAdminBackend
from splitserve.worker.core import WorkerCore
from splitserve.worker.decode import DecodeService
from splitserve.worker.prefill import PrefillService

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("nats", "NIXL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_worker(config_path: Path, role: str) -> None:
    config = load_worker_config(config_path, role)
    configure_logging(config.log_level)
    asyncio.run(serve(config, config_hash(config_path)))


async def serve(config: WorkerConfig, cfg_hash: str = "") -> None:
    core = WorkerCore(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await core.start_engine()
    role: DecodeService | PrefillService = (
        DecodeService(core) if config.role == "decode" else PrefillService(core))
    admin = WorkerAdminBackend(core, cfg_hash, role)
    # NOT_SERVING until the broker and the registry are reached
    server = await start_grpc_server(
        config.grpc_address, role if isinstance(role, DecodeService) else None, admin,
        serving=False)
    try:
        await core.start_messaging(server.address)
        await role.start()
        server.set_serving(True)
        log.info("worker %s ready: role %s, gRPC %s, NATS %s", core.worker_id, config.role,
                 server.address, config.nats_url)
        await stop.wait()
        log.info("worker %s: draining (grace %.0f s)", core.worker_id, config.drain_grace_s)
        await server.drain(config.drain_grace_s)  # health NOT_SERVING, in-flight finish
    finally:
        await role.stop()
        await server.stop(grace_s=1.0)
        await core.stop()
        log.info("worker %s stopped", core.worker_id)
