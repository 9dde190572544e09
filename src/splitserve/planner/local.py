"""The `local` actuator: the planner starts and stops worker processes on its own machine
(`splitserve up`, or one box without systemd).

- add: a worker of the role is started as `splitserve <role> --config F`, F written from
  the worker config template (`actuator.local_worker_config`) with role, worker id
  `local-<k>` (the lowest free k below `local_max_workers`), gRPC on a free port and no
  metrics port; `{worker_id}` in the template's `nats_auth` becomes the id (each planner
  -started worker logs in as itself: `splitserve up` makes those broker users up front).
  Done when its stats name the role (within `call_timeout_s`), else reported and retried;
- remove: SIGTERM to the most recently started worker of the role that this planner
  started (it drains, then exits); workers it did not start are never stopped: with
  none of its own left, the action says so;
- the planner stopping cleanly stops its workers (SIGTERM, they drain); killed, it
  leaves them serving (they run in their own sessions).
Files and logs go to `local_state_dir` (default: the template's folder).
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from splitserve.config.daemon import config_to_yaml, load_worker_config
from splitserve.config.planner import ActuatorConfig
from splitserve.daemons.children import start_daemon
from splitserve.errors import ConfigError
from splitserve.planner.actuators import ActuationFailed, Actuator, WorkerRef, differences
from splitserve.planner.model import Plan, Role

log = logging.getLogger(__name__)

ID_PREFIX = "local-"
STOP_TIMEOUT_S = 90.0  # a worker's drain (drain_grace_s <= 60) and its way out


@dataclass
class LocalWorker:
    worker_id: str
    role: Role
    process: subprocess.Popen[bytes]


class LocalActuator(Actuator):
    kind = "local"

    def __init__(self, config: ActuatorConfig, clock: Callable[[], float],
                 reported_role: Callable[[str], Role | None]) -> None:
        super().__init__(config, clock)
        self.reported_role = reported_role
        if not config.local_worker_config:  # `splitserve up` fills it in; a daemon must
            raise ConfigError("actuator.local_worker_config",
                              "the local actuator needs a worker config to start workers from")
        template = Path(config.local_worker_config)
        self.template = load_worker_config(template)  # ConfigError at start, field named
        self.state_dir = Path(config.local_state_dir or template.parent)
        self.started: list[LocalWorker] = []

    def _alive(self, role: Role) -> list[LocalWorker]:
        return [w for w in self.started if w.role is role and w.process.poll() is None]

    def _actions(self, plan: Plan, workers: Sequence[WorkerRef]
                 ) -> tuple[tuple[str, ...], Awaitable[None] | None]:
        diff = differences(plan, workers)
        for role, n in diff.items():  # one worker per actuation
            if n > 0:
                worker_id = self._free_id()
                if worker_id is None:
                    return ((f"cannot add {role.value}: {self.config.local_max_workers} "
                            "planner-started workers already"),), None
                return (f"start {worker_id} as {role.value}",), self._start(worker_id, role)
            if n < 0:
                own = self._alive(role)
                if not own:
                    return ((f"cannot remove {role.value}: no {role.value} worker started "
                            "by this planner"),), None
                return (f"stop {own[-1].worker_id} ({role.value})",), self._stop(own[-1])
        return (), None

    def _free_id(self) -> str | None:
        taken = {w.worker_id for w in self.started if w.process.poll() is None}
        for k in range(self.config.local_max_workers):
            if f"{ID_PREFIX}{k}" not in taken:
                return f"{ID_PREFIX}{k}"
        return None

    async def _start(self, worker_id: str, role: Role) -> None:
        auth = self.template.nats_auth
        config = replace(
            self.template, role=role.value, worker_id=worker_id,  # type: ignore[arg-type]
            grpc_address="127.0.0.1:0", metrics_address="",
            nats_auth=replace(auth, user=auth.user.replace("{worker_id}", worker_id),
                              password_file=auth.password_file.replace("{worker_id}",
                                                                        worker_id)))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{worker_id}.yaml"
        path.write_text(config_to_yaml(config))
        process = start_daemon(role.value, path, self.state_dir / f"{worker_id}.log")
        worker = LocalWorker(worker_id, role, process)
        self.started.append(worker)
        log.info("local: started %s as %s (pid %d)", worker_id, role.value, process.pid)
        deadline = self.clock() + self.config.call_timeout_s
        while self.reported_role(worker_id) is not role:
            if process.poll() is not None:
                raise ActuationFailed(f"{worker_id} exited with {process.returncode}; see "
                                      f"{self.state_dir / (worker_id + '.log')}")
            if self.clock() >= deadline:
                raise ActuationFailed(f"{worker_id} did not report role {role.value} within "
                                      f"{self.config.call_timeout_s:g} s")
            await asyncio.sleep(0.5)

    async def _stop(self, worker: LocalWorker) -> None:
        worker.process.terminate()  # SIGTERM: the worker drains, deregisters, exits
        code = await asyncio.to_thread(_wait, worker.process, STOP_TIMEOUT_S)
        log.info("local: %s stopped (exit %s)", worker.worker_id, code)
        if code != 0:
            raise ActuationFailed(f"{worker.worker_id} exited with {code} when stopped")

    async def close(self) -> None:
        """Stop every worker this planner started (they drain first)."""
        await super().close()
        alive = [w for w in self.started if w.process.poll() is None]
        for worker in alive:
            worker.process.terminate()
        for worker in alive:
            code = await asyncio.to_thread(_wait, worker.process, STOP_TIMEOUT_S)
            log.info("local: %s stopped with the planner (exit %s)", worker.worker_id, code)


def _wait(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
