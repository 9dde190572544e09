"""The planner on a real broker: the tick (observe, lock, plan, write, act), its modes,
two planners at once, and the daemon as operators see it (grpcurl, SetMode, SIGTERM).

Workers are represented by what the planner reads of them: a descriptor in the
registry and WorkerStats on their subject, both written through the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from grpc_fixtures import GRPCURL, run_tool
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config.planner import PlannerConfig, ScalingConfig, ThresholdConfig
from splitserve.planner.actuators import Actuator
from splitserve.planner.leader import LOCK_KEY, PlannerLock
from splitserve.planner.metrics import PlannerMetrics
from splitserve.planner.model import Mode, Role
from splitserve.planner.observe import StatsBook
from splitserve.planner.runner import AUDIT_KEY, PlannerRunner
from splitserve.queue.broker import NatsServer, find_free_port
from splitserve.queue.connection import BrokerConnection
from splitserve.queue.policy import PolicyStore
from splitserve.queue.registry import WorkerRegistry
from splitserve.queue.settings import BucketSettings
from splitserve.queue.stats import StatsSubscription, publish_stats
from splitserve.routing.policy import ROUTING_POLICY_KEY
from splitserve.rpc.jobs_pb2 import WorkerStats
from splitserve.rpc.worker_pb2 import WorkerDescriptor

pytestmark = pytest.mark.timeout(90)

SETTINGS = BucketSettings()


async def register(registry: WorkerRegistry, worker_id: str, role: str) -> None:
    descriptor = WorkerDescriptor(worker_id=worker_id, role=role, grpc_address="127.0.0.1:1",
                                  geometry=WorkerDescriptor.PageGeometry(
                                      page_size=16, bytes_per_page=16 * 1000))
    await registry.register(worker_id, descriptor.SerializeToString())


def stats(worker_id: str, role: str, **fields: float) -> WorkerStats:
    return WorkerStats(worker_id=worker_id, role=role, timestamp_unix_ns=time.time_ns(),
                       **fields)  # type: ignore[arg-type]


@pytest.fixture
async def cluster(nats_conn: BrokerConnection) -> AsyncIterator[tuple[
        WorkerRegistry, PolicyStore, StatsBook]]:
    registry = await WorkerRegistry.open(nats_conn.js, SETTINGS)
    store = await PolicyStore.open(nats_conn.js, SETTINGS)
    book = StatsBook(max_age_s=30)
    subscription = await StatsSubscription.subscribe(nats_conn.nc)

    async def feed() -> None:
        async for s in subscription:
            book.add(s, time.monotonic())

    task = asyncio.create_task(feed())
    await register(registry, "d0", "decode")
    await register(registry, "p0", "prefill")
    # remote is never faster (500 ms queue): the threshold should rise, 128 -> 192; the
    # pool clears 1000 tok/s x 2 s / 400 tokens = 5 jobs within the SLO: 16 -> 8 (a step)
    await publish_stats(nats_conn.nc, stats("d0", "decode", tokens_per_s=40,
                                            prefill_rate_tokens_per_s=1000))
    await publish_stats(nats_conn.nc, stats("p0", "prefill", prefill_rate_tokens_per_s=1000,
                                            queue_p50_ms=500, mean_prefill_tokens=400))
    await publish_stats(nats_conn.nc, stats("ghost", "decode", tokens_per_s=999))
    for _ in range(100):
        if len(book.loads(time.monotonic())) == 2:
            break
        await asyncio.sleep(0.05)
    yield registry, store, book
    task.cancel()
    await subscription.close()
    await registry.close()


def runner(cluster: tuple[WorkerRegistry, PolicyStore, StatsBook], conn: BrokerConnection,
           mode: str, me: str = "planner-a",
           clock: Callable[[], float] = time.monotonic, settle_s: float = 0.0) -> PlannerRunner:
    registry, store, book = cluster
    config = PlannerConfig(mode=mode, settle_s=settle_s,  # type: ignore[arg-type]
                           scaling=ScalingConfig(scale_up_cooldown_s=0),
                           thresholds=ThresholdConfig(cooldown_s=0))
    return PlannerRunner(config, me, store, registry, conn.js,
                         Actuator(config.actuator, clock), book, clock=clock)


async def test_a_silent_worker_holds_the_plan_then_is_reported_and_left_out(
        cluster, nats_conn) -> None:
    registry, _, book = cluster
    await register(registry, "d1", "decode")  # registered, never publishes stats
    now = [time.monotonic()]
    r = runner(cluster, nats_conn, "advise", clock=lambda: now[0])
    record = await r.tick()
    assert record.plan is None and record.note == "waiting for stats of d1"
    now[0] += 31.0  # past stats_max_age_s (30) since the registry first listed d1
    book.add(stats("d0", "decode", tokens_per_s=40, prefill_rate_tokens_per_s=1000), now[0])
    book.add(stats("p0", "prefill", prefill_rate_tokens_per_s=1000, queue_p50_ms=500,
                   mean_prefill_tokens=400), now[0])
    record = await r.tick()
    assert record.plan is not None, record.note
    assert "unresponsive" in record.note and "d1" in record.note
    assert r.unresponsive == ("d1",)
    assert sum(record.current.values()) == 2  # planned from d0 and p0 only
    await registry.deregister("d1")
    record = await r.tick()
    assert record.plan is not None and record.note == "" and r.unresponsive == ()


async def test_no_plan_until_the_registered_workers_held_for_settle_s(cluster, nats_conn) -> None:
    registry, _, book = cluster
    now = [time.monotonic()]
    r = runner(cluster, nats_conn, "auto", clock=lambda: now[0], settle_s=10.0)
    record = await r.tick()  # the planner's first look: the cluster may still be forming
    assert record.plan is None and record.actions == ()
    assert record.note == "waiting: the registered workers changed 0 s ago (settle_s 10)"
    now[0] += 9.0
    assert (await r.tick()).plan is None
    now[0] += 1.0
    assert (await r.tick()).plan is not None  # the same two workers for 10 s
    await register(registry, "d1", "decode")  # a worker joins: settle again
    now[0] += 1.0
    assert (await r.tick()).note == "waiting for stats of d1"
    book.add(stats("d1", "decode", tokens_per_s=40), now[0])
    now[0] += 1.0
    record = await r.tick()  # its stats came: still settling
    assert record.plan is None and "changed 1 s ago" in record.note, record.note
    now[0] += 10.0
    book.add(stats("d1", "decode", tokens_per_s=40), now[0])
    for s in (stats("d0", "decode", tokens_per_s=40, prefill_rate_tokens_per_s=1000),
              stats("p0", "prefill", prefill_rate_tokens_per_s=1000)):
        book.add(s, now[0])
    record = await r.tick()
    assert record.plan is not None and record.current[Role.DECODE] == 2, record.note


async def test_auto_writes_thresholds_with_an_audit_record(cluster, nats_conn) -> None:
    r = runner(cluster, nats_conn, "auto")
    record = await r.tick()
    assert record.leader and record.plan is not None
    assert {w: n for w, n in record.current.items()} == {
        role: 1 for role in record.current}  # the unregistered "ghost" is not counted
    store = cluster[1]
    routing = await store.get(ROUTING_POLICY_KEY)
    assert routing is not None
    assert json.loads(routing.value) == {"prefill_length_threshold": 192,
                                         "moderate_length_threshold": 72,
                                         "prefill_queue_max": 8}
    audit = await store.get(AUDIT_KEY)
    assert audit is not None
    (entry,) = json.loads(audit.value)
    assert entry["old_value"] == "" and entry["revision"] == routing.revision
    assert "prefill_length_threshold 128 -> 192" in entry["why"]
    assert r.num_policy_writes == 1
    # the next tick starts from the value in force: one more bounded step
    record = await r.tick()
    assert record.thresholds_in_force.prefill_length_threshold == 192
    assert record.plan.thresholds.prefill_length_threshold == 288
    assert r.num_policy_writes == 2 and len(r.audit) == 2
    exposed = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(
                   PlannerMetrics(r).exposition().decode()) for s in f.samples}
    assert exposed[("splitserve:planner_policy_writes_total", ())] == 2.0
    assert exposed[("splitserve:planner_threshold", (("name", "prefill_length_threshold"),))
                   ] == 192.0  # in force at the last tick; the plan's 288 is the next
    for role in record.current:
        assert exposed[("splitserve:planner_target_workers", (("role", role.value),))
                       ] == record.plan.count(role)


async def test_advise_and_off_write_nothing(cluster, nats_conn) -> None:
    r = runner(cluster, nats_conn, "advise")
    record = await r.tick()
    assert record.plan is not None and record.plan.thresholds.prefill_length_threshold == 192
    assert any(a.startswith("advise: set thresholds") for a in record.actions)
    assert await cluster[1].get(ROUTING_POLICY_KEY) is None
    r.set_mode(Mode.OFF)
    record = await r.tick()
    assert record.plan is None and record.note == "mode off"
    assert await cluster[1].get(ROUTING_POLICY_KEY) is None
    assert r.num_policy_writes == 0


async def test_two_planners_one_leads_and_the_standby_takes_over(cluster, nats_conn) -> None:
    a, b = runner(cluster, nats_conn, "auto", "planner-a"), runner(
        cluster, nats_conn, "auto", "planner-b")
    assert (await a.tick()).leader
    standby = await b.tick()
    assert not standby.leader and standby.note == "standby: planner-a leads"
    assert b.num_policy_writes == 0
    await a.lock.release()
    assert (await b.tick()).leader
    assert not (await a.tick()).leader


async def test_an_expired_hold_is_taken_over(nats_conn: BrokerConnection) -> None:
    store = await PolicyStore.open(nats_conn.js, SETTINGS)
    a, b = PlannerLock(store, "a", ttl_s=5), PlannerLock(store, "b", ttl_s=5)
    now = time.time()
    assert await a.tick(now) and not await b.tick(now + 4)
    assert await b.tick(now + 6)  # a died: its hold ended
    assert not await a.tick(now + 7) and a.holder == "b"
    entry = await store.get(LOCK_KEY)
    assert entry is not None and json.loads(entry.value)["holder"] == "b"


# --- the daemon --------------------------------------------------------------------------

def start_planner(tmp_path: Path, nats_url: str, name: str, **extra: object) -> tuple[
        subprocess.Popen[bytes], str, Path]:
    port = find_free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"grpc_address": f"127.0.0.1:{port}", "nats_url": nats_url,
                                "planner_id": name, "interval_s": 0.5, "lock_ttl_s": 2,
                                "mode": "advise", **extra}))
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "splitserve.cli", "planner", "--config",
                             str(path)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    return proc, f"127.0.0.1:{port}", log


async def get_plan(address: str) -> dict[str, object]:
    rc, out, err = await run_tool(GRPCURL, "-plaintext", address,
                                  "splitserve.v1.Planner/GetPlan")
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def scrape(port: int) -> dict[str, float]:
    """The planner's /metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items())):
            sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


async def wait_for(predicate, address: str, timeout_s: float = 20.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            plan = await get_plan(address)
            if predicate(plan):
                return plan
        except AssertionError:
            pass  # not listening yet
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.3)


@pytest.mark.slow
async def test_daemon_grpcurl_setmode_standby_and_sigterm(tmp_path: Path,
                                                          nats_server: NatsServer) -> None:
    a_metrics, b_metrics = find_free_port(), find_free_port()
    a, a_address, a_log = start_planner(tmp_path, nats_server.url, "planner-a",
                                        metrics_address=f"127.0.0.1:{a_metrics}")
    b = None
    try:
        plan = await wait_for(lambda p: p.get("leader"), a_address)
        assert plan["mode"] == "PLANNER_MODE_ADVISE" and plan["actuator"] == "dry-run"
        rc, out, err = await run_tool(GRPCURL, "-plaintext", a_address, "list")
        assert rc == 0, err
        assert set(out.split()) == {"splitserve.v1.Planner", "grpc.health.v1.Health",
                                    "grpc.reflection.v1alpha.ServerReflection"}
        rc, out, err = await run_tool(GRPCURL, "-plaintext", "-d",
                                      '{"mode": "PLANNER_MODE_OFF"}', a_address,
                                      "splitserve.v1.Planner/SetMode")
        assert rc == 0, err
        assert json.loads(out) == {"mode": "PLANNER_MODE_OFF",
                                   "previous": "PLANNER_MODE_ADVISE"}
        await run_tool(GRPCURL, "-plaintext", "-d", '{"mode": "PLANNER_MODE_AUTO"}',
                       a_address, "splitserve.v1.Planner/SetMode")
        rc, _, err = await run_tool(GRPCURL, "-plaintext", "-d", '{"mode": 9}', a_address,
                                    "splitserve.v1.Planner/SetMode")
        assert rc != 0 and "InvalidArgument" in err
        ticks_before = scrape(a_metrics)["splitserve:planner_ticks_total"]
        await wait_for(lambda p: p.get("mode") == "PLANNER_MODE_AUTO", a_address)
        await asyncio.sleep(1.2)  # two more ticks at 0.5 s
        metrics = scrape(a_metrics)
        assert metrics["splitserve:planner_ticks_total"] >= ticks_before + 1
        assert metrics["splitserve:planner_leader"] == 1.0
        assert {metrics[f"splitserve:planner_mode{{mode={m}}}"] for m in ("auto", "advise", "off")
                } == {1.0, 0.0} and metrics["splitserve:planner_mode{mode=auto}"] == 1.0
        assert metrics["splitserve:planner_workers{role=decode}"] == 0.0  # no workers here
        assert metrics["splitserve:planner_tick_failures_total"] == 0.0
        b, b_address, _ = start_planner(tmp_path, nats_server.url, "planner-b",
                                        metrics_address=f"127.0.0.1:{b_metrics}")
        plan = await wait_for(lambda p: "standby: planner-a leads" in p.get("reasons", []),
                              b_address)
        assert not plan.get("leader")
        assert scrape(b_metrics)["splitserve:planner_leader"] == 0.0
        a.send_signal(signal.SIGTERM)
        assert a.wait(timeout=30) == 0, a_log.read_text()[-3000:]
        await wait_for(lambda p: p.get("leader"), b_address, timeout_s=10)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_invalid_config_is_refused_with_the_field_named(tmp_path: Path) -> None:
    path = tmp_path / "planner.yaml"
    path.write_text("scaling:\n  pd_ratio_min: 2\n  pd_ratio_max: 1\n")
    result = subprocess.run([sys.executable, "-m", "splitserve.cli", "planner", "--config",
                             str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert "scaling.pd_ratio_max: must be in [2, 1000], got 1" in result.stderr
