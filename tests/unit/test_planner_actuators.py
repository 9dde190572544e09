"""Actuators (planner/actuators.py): what each does with a plan, backoff after failures,
one actuation at a time. systemd cannot run here: `systemctl` is replaced by a recorder
that answers `list-units` from a set of running units (the hardware seam); the role
actuator's choice of worker is checked here, its flips end to end in
tests/e2e/test_planner_roles.py."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from splitserve.config.planner import ActuatorConfig
from splitserve.planner.actuators import (
    Actuator,
    Backoff,
    RoleActuator,
    SystemdActuator,
    WorkerRef,
    describe,
)
from splitserve.planner.model import Plan, Role, Thresholds, WorkerLoad

T = Thresholds(128, 48, 16)


def ref(worker_id: str, role: Role, running: int = 0, kv: float = 0.0,
        queued: int = 0) -> WorkerRef:
    return WorkerRef(WorkerLoad(worker_id, role, num_running=running, kv_usage=kv,
                                queue_depth=queued), "127.0.0.1:1")


def plan(num_prefill: int, num_decode: int) -> Plan:
    return Plan(0.0, num_prefill, num_decode, T)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(1.0, 5.0)
    assert b.ready(0)
    delays = []
    for t in range(5):
        b.failed(float(t))
        delays.append(b.delay_s)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not b.ready(8.9) and b.ready(9.0)
    b.succeeded()
    assert b.ready(0) and b.delay_s == 0


def test_dry_run_describes_and_does_nothing() -> None:
    workers = [ref("d0", Role.DECODE), ref("p0", Role.PREFILL)]
    actuator = Actuator(ActuatorConfig(), Clock())
    assert actuator.apply(plan(3, 1), workers) == ("dry-run: would add 2 prefill",)
    assert not actuator.busy
    assert describe(plan(0, 2), workers) == ("remove 1 prefill", "add 1 decode")
    assert actuator.apply(plan(1, 1), workers) == ()


class FakeSystemctl:
    """Records argv; `list-units` answers from `running`; start/stop update it."""

    def __init__(self, running: set[str], fail: int = 0) -> None:
        self.running = running
        self.calls: list[list[str]] = []
        self.fail = fail

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        if self.fail:
            self.fail -= 1
            return 1, "Failed to connect to bus: No such file or directory"
        verb = argv[2] if argv[1] == "--user" else argv[1]
        units = [a for a in argv[2:] if "@" in a and "*" not in a]
        if verb == "list-units":
            pattern = argv[-1].split("@")[0]
            return 0, "\n".join(f"{u} loaded active running splitserve"
                                for u in sorted(self.running) if u.startswith(pattern))
        if verb == "start":
            self.running.update(units)
        elif verb == "stop":
            self.running.difference_update(units)
        return 0, ""


async def settle(actuator: Actuator) -> None:
    for _ in range(100):
        if not actuator.busy:
            return
        await asyncio.sleep(0.01)


async def test_systemd_starts_the_lowest_free_and_stops_the_highest() -> None:
    fake = FakeSystemctl({"splitserve-decode@0.service", "splitserve-decode@2.service",
                          "splitserve-prefill@0.service"})
    actuator = SystemdActuator(ActuatorConfig(kind="systemd", systemctl_user=True), Clock(),
                               runner=fake)
    workers = [ref("d0", Role.DECODE), ref("d2", Role.DECODE), ref("p0", Role.PREFILL)]
    assert actuator.apply(plan(0, 4), workers) == ("systemd: remove 1 prefill",
                                                   "systemd: add 2 decode")
    await settle(actuator)
    assert actuator.error == "" and actuator.num_actions == 1
    verbs = [c[2:] for c in fake.calls if c[2] in ("start", "stop")]
    assert verbs == [["stop", "splitserve-prefill@0.service"],
                     ["start", "splitserve-decode@1.service", "splitserve-decode@3.service"]]
    assert all(c[:2] == ["systemctl", "--user"] for c in fake.calls)
    fake.calls.clear()
    workers = [ref(f"d{i}", Role.DECODE) for i in range(4)]
    actuator.apply(plan(0, 2), workers)
    await settle(actuator)
    assert [c[2:] for c in fake.calls if c[2] == "stop"] == [
        ["stop", "splitserve-decode@2.service", "splitserve-decode@3.service"]]


async def test_a_failing_systemctl_is_retried_with_backoff_and_never_raises() -> None:
    clock = Clock()
    fake = FakeSystemctl(set(), fail=2)
    actuator = SystemdActuator(ActuatorConfig(kind="systemd", retry_initial_s=2,
                                              retry_max_s=8), clock, runner=fake)
    workers = [ref("d0", Role.DECODE)]
    actuator.apply(plan(1, 1), workers)
    await settle(actuator)
    assert "exited 1: Failed to connect to bus" in actuator.error
    assert actuator.num_failures == 1
    pending = actuator.apply(plan(1, 1), workers)
    assert pending[-1].startswith("retry in 2 s after: systemd: add 1 prefill: ActuationFailed")
    clock.now = 2.0
    actuator.apply(plan(1, 1), workers)
    await settle(actuator)
    assert actuator.num_failures == 2 and actuator.backoff.delay_s == 4.0
    clock.now = 6.0
    actuator.apply(plan(1, 1), workers)
    await settle(actuator)
    assert actuator.error == "" and fake.running == {"splitserve-prefill@0.service"}


def test_role_actuator_flips_the_least_loaded_worker_of_the_shrinking_role() -> None:
    actuator = RoleActuator(ActuatorConfig(kind="role"), Clock(), lambda _: None)
    workers = [ref("d0", Role.DECODE, running=3), ref("d1", Role.DECODE, running=1, kv=0.5),
               ref("d2", Role.DECODE, running=1, kv=0.1)]
    actions, work = actuator._actions(plan(1, 2), workers)
    assert actions == ("flip d2 decode -> prefill",)
    assert work is not None
    work.close()  # type: ignore[attr-defined]  (not run: no worker listens here)
    actions, work = actuator._actions(plan(0, 4), workers)
    assert work is None  # a flip cannot add a worker


def test_a_worker_whose_requests_all_wait_for_a_remote_prefill_is_not_the_idle_one(
        ) -> None:
    """Long prompts prefilled remotely: nothing runs on d0 yet, 8 requests wait there
    (CI: the planner drained d0, the worker taking the burst, over the idle d1)."""
    actuator = RoleActuator(ActuatorConfig(kind="role"), Clock(), lambda _: None)
    workers = [ref("d0", Role.DECODE, queued=8), ref("d1", Role.DECODE)]
    actions, work = actuator._actions(plan(2, 1), workers)
    assert actions == ("flip d1 decode -> prefill",)
    work.close()  # type: ignore[union-attr]


def test_role_actuator_flips_a_worker_away_from_home_back_first() -> None:
    actuator = RoleActuator(ActuatorConfig(kind="role"), Clock(), lambda _: None)
    actuator.record_flip("d1", Role.DECODE, Role.PREFILL)  # d1 went decode -> prefill
    # p0 is idler, but d1 is the one away from its role: it goes back
    workers = [ref("d0", Role.DECODE, running=4), ref("p0", Role.PREFILL, running=0),
               ref("d1", Role.PREFILL, running=2)]
    actions, work = actuator._actions(plan(1, 2), workers)
    assert actions == ("flip d1 prefill -> decode",)
    work.close()  # type: ignore[union-attr]
    actuator.record_flip("d1", Role.PREFILL, Role.DECODE)  # home again: least loaded rules
    workers = [ref("d0", Role.DECODE, running=4), ref("p0", Role.PREFILL),
               ref("d1", Role.DECODE, running=2)]
    actions, work = actuator._actions(plan(2, 1), workers)
    assert actions == ("flip d1 decode -> prefill",)
    work.close()  # type: ignore[union-attr]


class FakeProcess:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


def test_local_actuator_starts_free_ids_and_stops_only_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from splitserve.planner.local import LocalActuator, LocalWorker

    template = tmp_path / "worker.yaml"
    template.write_text("nats_url: nats://127.0.0.1:4222\n")
    actuator = LocalActuator(ActuatorConfig(kind="local", local_worker_config=str(template),
                                            local_max_workers=2), Clock(), lambda _: None)
    workers = [ref("decode-0", Role.DECODE), ref("p0", Role.PREFILL)]
    # none of its own: a worker it did not start is never stopped
    assert actuator._actions(plan(0, 1), workers) == (
        ("cannot remove prefill: no prefill worker started by this planner",), None)
    actuator.started = [LocalWorker("local-0", Role.PREFILL, FakeProcess()),  # type: ignore[arg-type]
                        LocalWorker("local-1", Role.PREFILL, FakeProcess(code=0))]  # type: ignore[arg-type]
    actions, work = actuator._actions(plan(2, 1), workers)
    assert actions == ("start local-1 as prefill",)  # local-1 exited: its id is free again
    work.close()  # type: ignore[union-attr]
    actions, work = actuator._actions(plan(0, 1), workers)
    assert actions == ("stop local-0 (prefill)",)
    work.close()  # type: ignore[union-attr]
    actuator.started.append(LocalWorker("local-1", Role.DECODE, FakeProcess()))  # type: ignore[arg-type]
    assert actuator._actions(plan(1, 2), workers) == (
        ("cannot add decode: 2 planner-started workers already",), None)
