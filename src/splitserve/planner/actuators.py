"""Carrying out a plan: the difference between the workers per role now and the plan's
targets becomes actions.

- dry-run: the actions are described, nothing is done;
- role: one worker at a time is drained and flipped to the role that needs it
  (Admin/SetRole on it); the one flipped is the worker most recently flipped into its
  role (undoing flips restores the layout the operator chose: which cores or devices
  serve which role), else the least loaded of its role (fewest requests running or queued,
  then least KV in use). A flip that fails, or a worker that does not report
  its new role within `call_timeout_s` after it, is reported, and the next try waits
  out the backoff; the plan adapts on its own since it counts the roles the workers
  report;
- systemd: `systemctl start` the lowest free instance numbers of the role's unit
  template, `systemctl stop` the highest running ones (`list-units` says which run);
- local: worker processes started and stopped by the planner (planner/local.py).
Each actuation runs in the background, one at a time; `apply` only starts it, so a
slow drain never delays the next tick. Failures are retried with exponential backoff
(`retry_initial_s` doubling up to `retry_max_s`) and never end the planner.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from splitserve import client
from splitserve.config.planner import ActuatorConfig
from splitserve.planner.model import Plan, Role, WorkerLoad
from splitserve.rpc import admin_pb2
from splitserve.tasks import logged_task, stop_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRef:
    """A worker the actuator may act on: its load and where its Admin listens."""

    load: WorkerLoad
    grpc_address: str


class ActuationFailed(Exception):
    pass


class Backoff:
    """When the next try may start after failures: initial, doubled per failure, capped."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.delay_s = 0.0
        self.not_before_s = 0.0

    def failed(self, now_s: float) -> None:
        self.delay_s = min(self.max_s, self.delay_s * 2 if self.delay_s else self.initial_s)
        self.not_before_s = now_s + self.delay_s

    def succeeded(self) -> None:
        self.delay_s, self.not_before_s = 0.0, 0.0

    def ready(self, now_s: float) -> bool:
        return now_s >= self.not_before_s


def differences(plan: Plan, workers: Sequence[WorkerRef]) -> dict[Role, int]:
    """Target minus current, per role (positive: add)."""
    return {role: plan.count(role) - sum(1 for w in workers if w.load.role is role)
            for role in Role}


def describe(plan: Plan, workers: Sequence[WorkerRef]) -> tuple[str, ...]:
    return tuple(f"{'add' if n > 0 else 'remove'} {abs(n)} {role.value}"
                 for role, n in differences(plan, workers).items() if n)


class Actuator:
    """Base: background actuation, one at a time, with backoff. Subclasses implement
    `_actions` (what to do now: descriptions and one coroutine doing it)."""

    kind = "dry-run"

    def __init__(self, config: ActuatorConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.backoff = Backoff(config.retry_initial_s, config.retry_max_s)
        self.error = ""  # the last failure; "" once an actuation succeeds
        self._task: asyncio.Task[None] | None = None
        self.num_actions = 0
        self.num_failures = 0

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def apply(self, plan: Plan, workers: Sequence[WorkerRef]) -> tuple[str, ...]:
        """Start what `plan` needs unless an actuation runs or the backoff holds; the
        actions started, or what is pending and why."""
        if self.busy:
            return ("waiting: the previous actuation is still running",)
        wanted = describe(plan, workers)
        if not wanted:
            return ()
        if not self.backoff.ready(self.clock()):
            return (*wanted, (f"retry in {self.backoff.not_before_s - self.clock():.0f} s "
                             f"after: {self.error}"))
        actions, work = self._actions(plan, workers)
        if work is not None:
            self._task = logged_task(self._run(work, actions), f"actuator {self.kind}")
        return actions

    def _actions(self, plan: Plan, workers: Sequence[WorkerRef]
                 ) -> tuple[tuple[str, ...], Awaitable[None] | None]:
        return tuple(f"dry-run: would {a}" for a in describe(plan, workers)), None

    async def _run(self, work: Awaitable[None], actions: tuple[str, ...]) -> None:
        try:
            await asyncio.wait_for(work, self.config.call_timeout_s + self.config.drain_grace_s)
        except Exception as exc:  # noqa: BLE001 (an actuator failure never ends the planner)
            self.num_failures += 1
            self.error = f"{'; '.join(actions)}: {type(exc).__name__}: {exc}"
            self.backoff.failed(self.clock())
            log.warning("actuator %s failed (retry in %.0f s): %s", self.kind,
                        self.backoff.delay_s, self.error)
            return
        self.num_actions += 1
        self.error = ""
        self.backoff.succeeded()
        log.info("actuator %s done: %s", self.kind, "; ".join(actions))

    async def close(self) -> None:
        await stop_tasks(self._task)


class RoleActuator(Actuator):
    """Flips one worker at a time between prefill and decode (the total stays)."""

    kind = "role"

    def __init__(self, config: ActuatorConfig, clock: Callable[[], float],
                 reported_role: Callable[[str], Role | None]) -> None:
        super().__init__(config, clock)
        self.reported_role = reported_role  # the role a worker's latest stats name
        self.security = client.ClientSecurity.from_files(config.ca_file, "", "",
                                                         config.token_file)
        self._home: dict[str, Role] = {}  # a worker's role before its first flip
        self._away: dict[str, int] = {}  # workers away from home: the flip that sent them
        self._num_flips = 0

    def _actions(self, plan: Plan, workers: Sequence[WorkerRef]
                 ) -> tuple[tuple[str, ...], Awaitable[None] | None]:
        diff = differences(plan, workers)
        to = Role.PREFILL if diff[Role.PREFILL] > 0 else Role.DECODE
        source = Role.DECODE if to is Role.PREFILL else Role.PREFILL
        if diff[to] <= 0 or diff[source] >= 0:
            return describe(plan, workers), None  # nothing a flip can do
        candidates = [w for w in workers if w.load.role is source and w.grpc_address]
        if not candidates:
            return (f"no {source.value} worker with an Admin address to flip",), None
        worker = min(candidates, key=lambda w: (-self._away.get(w.load.worker_id, -1),
                                                w.load.num_running + w.load.queue_depth,
                                                w.load.kv_usage, w.load.worker_id))
        action = f"flip {worker.load.worker_id} {source.value} -> {to.value}"
        return (action,), self._flip(worker, to)

    def record_flip(self, worker_id: str, source: Role, to: Role) -> None:
        """Remember a flip: a worker away from its first role is flipped back first (the
        layout the operator chose, which cores or devices serve which role, returns)."""
        home = self._home.setdefault(worker_id, source)
        self._num_flips += 1
        if to is home:
            self._away.pop(worker_id, None)
        else:
            self._away[worker_id] = self._num_flips

    async def _flip(self, worker: WorkerRef, to: Role) -> None:
        options = client.CallOptions(security=self.security,
                                     timeout_s=self.config.call_timeout_s)
        result = await client.admin_set_role(worker.grpc_address, to.value,
                                             self.config.drain_grace_s, options)
        if result.role != to.value:
            raise ActuationFailed(f"{worker.load.worker_id} stayed {result.role} "
                                  f"({admin_pb2.RoleSwitchOutcome.Name(result.outcome)}, "
                                  f"{result.num_in_flight} in flight)")
        self.record_flip(worker.load.worker_id, worker.load.role, to)
        deadline = self.clock() + self.config.call_timeout_s
        while self.reported_role(worker.load.worker_id) is not to:
            if self.clock() >= deadline:
                raise ActuationFailed(f"{worker.load.worker_id} did not report role "
                                      f"{to.value} within {self.config.call_timeout_s:g} s")
            await asyncio.sleep(0.5)


Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]


async def run_command(argv: Sequence[str]) -> tuple[int, str]:
    """Exit code and combined output of a command (no shell)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


class SystemdActuator(Actuator):
    """`systemctl start|stop` of numbered template units."""

    kind = "systemd"

    def __init__(self, config: ActuatorConfig, clock: Callable[[], float],
                 runner: Runner = run_command) -> None:
        super().__init__(config, clock)
        self.runner = runner

    def _unit(self, role: Role, n: int) -> str:
        template = self.config.unit_prefill if role is Role.PREFILL else self.config.unit_decode
        return template.format(n=n)

    def _systemctl(self, *args: str) -> list[str]:
        return [self.config.systemctl, *(["--user"] if self.config.systemctl_user else []),
                *args]

    async def running(self, role: Role) -> list[int]:
        """Instance numbers of the role's units active or starting, ascending."""
        pattern = self._unit(role, 0).replace("@0", "@*")
        code, out = await self.runner(self._systemctl(
            "list-units", "--plain", "--no-legend", "--all", "--state=active,activating",
            pattern))
        if code != 0:
            raise ActuationFailed(f"systemctl list-units exited {code}: {out[:200]}")
        prefix, _, suffix = self._unit(role, 0).partition("0")
        numbers = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix))
        return sorted({int(m.group(1)) for line in out.splitlines()
                       if (m := numbers.match(line.split()[0] if line.split() else ""))})

    def _actions(self, plan: Plan, workers: Sequence[WorkerRef]
                 ) -> tuple[tuple[str, ...], Awaitable[None] | None]:
        diff = differences(plan, workers)
        return (tuple(f"systemd: {a}" for a in describe(plan, workers)),
                self._scale(diff))

    async def _scale(self, diff: dict[Role, int]) -> None:
        for role, n in diff.items():
            if n == 0:
                continue
            active = await self.running(role)
            if n > 0:
                free = [i for i in range(len(active) + n) if i not in active][:n]
                units = [self._unit(role, i) for i in free]
                verb = "start"
            else:
                units = [self._unit(role, i) for i in sorted(active)[n:]]
                verb = "stop"
            if not units:
                continue
            code, out = await self.runner(self._systemctl(verb, *units))
            if code != 0:
                raise ActuationFailed(f"systemctl {verb} {' '.join(units)} exited {code}: "
                                      f"{out[:200]}")
            log.info("systemd: %s %s", verb, " ".join(units))


def make_actuator(config: ActuatorConfig, clock: Callable[[], float],
                  reported_role: Callable[[str], Role | None]) -> Actuator:
    if config.kind == "role":
        return RoleActuator(config, clock, reported_role)
    if config.kind == "systemd":
        return SystemdActuator(config, clock)
    if config.kind == "local":
        from splitserve.planner.local import LocalActuator  # it builds on this module

        return LocalActuator(config, clock, reported_role)
    return Actuator(config, clock)
