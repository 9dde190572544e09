"""`AdminBackend` for a worker whose whole engine runs in this process (no broker)."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

from splitserve.config.daemon import config_to_yaml
from splitserve.config.reload import ReloadResult
from splitserve.control.backend import (
    DRAINING,
    SERVING,
    ConfigView,
    StatusCounters,
    WorkerInfo,
    WorkerStatus,
)
from splitserve.control.errors import ReloadUnsupported
from splitserve.control.tracker import RequestTracker
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.output import RequestOutput

log = logging.getLogger(__name__)


def config_hash(engine: AsyncEngine) -> str:
    """Short, stable identity of the engine config (frozen dataclass repr)."""
    return hashlib.sha256(repr(engine.info.config).encode()).hexdigest()[:16]


class LocalAdminBackend:
    """Status from the in-process engine; drain waits for this server's Generate calls.

    Every prefill is local here, so `num_local_prefills` counts requests that got
    their first token. Set `grpc_address` once the server is bound (it is only
    reported by ListWorkers).
    """

    def __init__(self, engine: AsyncEngine, *, worker_id: str | None = None,
                 role: str = "decode", grpc_address: str = "",
                 config_hash_value: str | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id or f"{role}-{uuid.uuid4().hex[:8]}"
        self.role = role
        self.grpc_address = grpc_address
        self.config_hash = config_hash_value or config_hash(engine)
        self.tracker = RequestTracker()
        self._draining = False
        self._started_s = time.monotonic()
        self._num_first_tokens = 0
        self._num_finished = 0
        engine.step_listeners.append(self._on_step)

    def is_draining(self) -> bool:
        return self._draining

    def _on_step(self, outputs: list[RequestOutput]) -> None:
        # Runs on the event loop thread (AsyncEngine delivers outputs there).
        for out in outputs:
            if out.new_token_ids and out.num_output_tokens == len(out.new_token_ids):
                self._num_first_tokens += 1
            if out.finished:
                self._num_finished += 1

    async def status(self) -> WorkerStatus:
        counters = StatusCounters(num_local_prefills=self._num_first_tokens,
                                  num_rejects=self.tracker.num_rejects,
                                  num_requests_finished=self._num_finished)
        return WorkerStatus(
            role=self.role, worker_id=self.worker_id, config_hash=self.config_hash,
            state=DRAINING if self._draining else SERVING, engine=self.engine.stats,
            num_in_flight=self.tracker.num_in_flight,
            uptime_s=time.monotonic() - self._started_s, counters=counters,
            model_fingerprint=self.engine.info.fingerprint)

    async def list_workers(self) -> list[WorkerInfo]:
        info = self.engine.info
        return [WorkerInfo(self.worker_id, self.role, self.grpc_address, info.num_pages,
                           info.page_size, info.dtype, info.fingerprint)]

    async def drain(self, grace_s: float) -> str:
        if not self._draining:
            log.info("worker %s draining: %d requests in flight, grace %.1fs", self.worker_id,
                     self.tracker.num_in_flight, grace_s)
        self._draining = True
        if await self.tracker.wait_idle(grace_s):
            log.info("worker %s drained", self.worker_id)
        else:
            log.warning("worker %s: grace of %.1fs ran out with %d requests in flight",
                        self.worker_id, grace_s, self.tracker.num_in_flight)
        return DRAINING if self._draining else SERVING

    async def resume(self) -> str:
        if self._draining:
            log.info("worker %s resumes serving", self.worker_id)
        self._draining = False
        return SERVING

    async def reload(self) -> ReloadResult:
        raise ReloadUnsupported("this server was started without a config file; "
                                "restart it to change its engine config")

    async def config(self) -> ConfigView:
        return ConfigView(config_to_yaml({"engine": self.engine.info.config}),
                          self.config_hash)
