"""The chaos suite's faults: the workers each row needs and the script that strikes.

A fault script runs next to the row's workload and returns when the fault is over
(the worker restarted, the broker back...); the last 30% of the requests are held
back until then, so every row also serves requests after its fault. Config-level
faults (a flaky transfer, a corrupting or skewed prefill worker, a tiny KV pool,
duplicate ids) strike from the first request on.

Rows (workers: decode-0 and prefill-0 on one nats-server unless said otherwise;
prefill-0 and prefill-1 hold every job HOLD_S in flight, like a busy machine, so a
fault meets jobs in flight however fast the engine is):
- duplicate_ids: every 4th request is sent again with the same id while its first
  send streams.
- invalid_reload: invalid values written into the workers' config files, then
  Admin/Reload, mid-run.
- prefill_stop: SIGSTOP the prefill worker with a job in flight, past every lease.
- prefill_kill: SIGKILL the prefill worker with a job in flight; restart it (same id).
- nats_restart: the prefill worker is stopped so jobs queue; nats-server stop/start.
- decode_restart_same_id: jobs queue as above (30 s leases); SIGKILL the decode
  worker and restart it on the same id and port: only incarnations fence the jobs.
- two_prefill_one_killed: prefill-0 and prefill-1; SIGKILL the busier one (2 jobs in
  flight); its registry entry expires 15 s later.
- transfer_failure: prefill-transferfail fails every 3rd page write.
- clock_offset_behind / _ahead: prefill-behind / prefill-ahead run 2 s off (skew
  margin 0.3 s).
- corrupt_page: decode-checksum (kv_checksum) and prefill-corrupt, which flips a
  byte of every 3rd job's partial last page after checksumming it.
- pool_exhausted: decode-smallpool, a 60-page KV pool (two long prompts' worth).
- nats_node_kill: a 3-node NATS cluster (3 replicas); SIGKILL the node leading the
  prefill stream, restart it ~6 s later.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace

import grpc
from chaos_cluster import (
    ENGINE,
    Daemon,
    config_with,
    get_config,
    get_status,
    reload_config,
    stream_leader,
    write_config_text,
)
from chaos_row import Fault, Row, jobs_in_flight, jobs_queued, max_lease_s

from splitserve.config.daemon import FaultConfig, LeaseConfig, config_to_yaml
from splitserve.queue.broker import NatsServer
from splitserve.queue.cluster import NatsCluster
from splitserve.queue.settings import BucketSettings
from splitserve.rpc import admin_pb2, admin_pb2_grpc

# Long enough that the queued jobs of a killed decode worker are still within their
# lease when the prefill worker takes them after the restart (~10 s on 2 busy cores):
# only the incarnation can fence them.
RESTART_LEASE = LeaseConfig(base_s=30.0, per_token_ms=2.0, skew_margin_s=0.3)
CLOCK_OFFSET_S = 2.0  # well beyond the 0.3 s skew margin
HOLD_S = 1.0  # well within LEASE (3 s and up), which the prefill worker renews anyway
WORKER_TTL_S = BucketSettings().worker_ttl_s  # a killed worker leaves the registry after it

# Worker variants by id: config overrides on top of chaos_cluster.worker_config.
DECODE_VARIANTS: dict[str, dict[str, object]] = {
    "decode-0": {},
    "decode-checksum": {"kv_checksum": True},
    # 60 pages = 960 tokens: two 400-token prompts with their outputs, little else.
    "decode-smallpool": {"engine": replace(ENGINE, num_pages=60)},
}
PREFILL_VARIANTS: dict[str, dict[str, object]] = {
    # Rows with a fault that must meet jobs in flight run these two: every job stays
    # in flight for HOLD_S (a busy prefill machine), however fast the engine.
    "prefill-0": {"faults": FaultConfig(prefill_hold_s=HOLD_S)},
    "prefill-1": {"faults": FaultConfig(prefill_hold_s=HOLD_S)},
    "prefill-transferfail": {"faults": FaultConfig(fail_transfer_every=3)},
    "prefill-corrupt": {"faults": FaultConfig(corrupt_page_every=3)},
    "prefill-behind": {"faults": FaultConfig(clock_offset_s=-CLOCK_OFFSET_S)},
    "prefill-ahead": {"faults": FaultConfig(clock_offset_s=CLOCK_OFFSET_S)},
}


async def prefill_kill(row: Row) -> None:
    await row.warm_up()
    prefill = row.prefills[0]
    num_jobs = await jobs_in_flight(row, prefill)
    await row.ledger.observe([prefill])
    row.strike(f"SIGKILL {prefill.worker_id} with {num_jobs} job(s) in flight")
    row.evidence["jobs_in_flight_at_fault"] = num_jobs
    row.cluster.kill(prefill.worker_id)
    await asyncio.sleep(1.0)
    row.prefills[0] = await asyncio.to_thread(row.cluster.restart, prefill.worker_id)
    row.note(f"{prefill.worker_id} restarted (same id, new incarnation)")


async def prefill_stop(row: Row) -> None:
    await row.warm_up()
    prefill = row.prefills[0]
    num_jobs = await jobs_in_flight(row, prefill)
    prefill.signal(signal.SIGSTOP)
    row.evidence["jobs_in_flight_at_fault"] = num_jobs
    stopped_s = max_lease_s(prefill.config.lease) + 1.0
    row.strike(f"SIGSTOP {prefill.worker_id} with {num_jobs} job(s) in flight, "
               f"for {stopped_s:.1f} s (past every lease)")
    await asyncio.sleep(stopped_s)
    prefill.signal(signal.SIGCONT)
    row.note(f"SIGCONT {prefill.worker_id}")


async def decode_restart_same_id(row: Row) -> None:
    decode, prefill = row.decode, row.prefills[0]
    write_config_text(decode.config_path,
                      config_to_yaml(replace(decode.config, lease=RESTART_LEASE)))
    reply = await reload_config(decode.address)
    row.note(f"lease of {decode.worker_id} reloaded to {RESTART_LEASE.base_s:.0f} s: "
             f"applied {list(reply.applied_fields)} {reply.error}")
    try:
        await row.warm_up()
        prefill.signal(signal.SIGSTOP)
        row.note(f"SIGSTOP {prefill.worker_id}: jobs queue up")
        num_jobs = await jobs_queued(row, 2)
        row.evidence["jobs_queued_at_fault"] = num_jobs
        await row.ledger.observe([decode])
        row.strike(f"SIGKILL {decode.worker_id} with {num_jobs} job(s) queued")
        row.cluster.kill(decode.worker_id)
        # restarts from the short-lease config it was started with
        row.decode = await asyncio.to_thread(row.cluster.restart, decode.worker_id)
        row.note(f"{decode.worker_id} restarted on {decode.address} (same id and port)")
    finally:
        prefill.signal(signal.SIGCONT)
        row.note(f"SIGCONT {prefill.worker_id}")
        if row.decode is decode and decode.alive:  # not restarted: back to the short lease
            write_config_text(decode.config_path, config_to_yaml(decode.config))
            await reload_config(decode.address)


async def two_prefill_one_killed(row: Row) -> None:
    await row.warm_up()
    seen: dict[str, int] = {}

    started_s = time.monotonic()

    async def busy() -> bool:
        """Mid-batch (2 jobs) if two long prompts overlap on one worker within 3 s,
        else mid-job."""
        for p in row.prefills:
            seen[p.worker_id] = await row.in_flight(p)
        return max(seen.values()) >= (2 if time.monotonic() - started_s < 3.0 else 1)

    await row.until(busy, 20.0, "a prefill worker with jobs in flight")
    victim = max(row.prefills, key=lambda p: seen.get(p.worker_id, 0))
    await row.ledger.observe([victim])
    row.strike(f"SIGKILL {victim.worker_id} with {seen.get(victim.worker_id, 0)} job(s) "
               f"in flight ({seen})")
    row.cluster.kill(victim.worker_id)
    row.evidence["jobs_in_flight_at_fault"] = seen.get(victim.worker_id, 0)
    row.fault_over()  # nothing comes back; the survivor serves on

    async def gone() -> bool:
        registered = await _registered(row.decode)
        # ListWorkers now and then answers an empty list (read_bucket racing a registry
        # heartbeat, ~1 call in 250): an answer without the decode worker itself is
        # not believed.
        return (registered is not None and row.decode.worker_id in registered
                and victim.worker_id not in registered)

    # The decode worker fails the attempts then waiting when the victim's entry
    # expires; the row (and its counters) lasts until then.
    deadline = time.monotonic() + WORKER_TTL_S + 10.0
    while time.monotonic() < deadline and not await gone():
        await asyncio.sleep(0.2)
    row.note(f"{victim.worker_id} {'left' if await gone() else 'is still in'} the registry")


async def _registered(daemon: Daemon) -> set[str] | None:
    """The worker ids in the registry as `daemon` sees it (None: no answer)."""
    try:
        async with grpc.aio.insecure_channel(daemon.address) as channel:
            reply = await admin_pb2_grpc.AdminStub(channel).ListWorkers(
                admin_pb2.ListWorkersRequest(), timeout=2.0)
    except grpc.aio.AioRpcError:
        return None
    return {w.worker_id for w in reply.workers}


async def nats_restart(row: Row) -> None:
    nats = row.cluster.nats
    assert isinstance(nats, NatsServer)
    await row.warm_up()
    prefill = row.prefills[0]
    prefill.signal(signal.SIGSTOP)
    row.note(f"SIGSTOP {prefill.worker_id}: jobs queue up")
    try:
        num_jobs = await jobs_queued(row, 1)
        row.evidence["jobs_queued_at_fault"] = num_jobs
        row.strike(f"nats-server stopped with {num_jobs} job(s) queued")
        await asyncio.to_thread(nats.stop)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(nats.start)
        row.note("nats-server started again (same port and store)")
    finally:
        prefill.signal(signal.SIGCONT)
        row.note(f"SIGCONT {prefill.worker_id}")


async def nats_node_kill(row: Row) -> None:
    nats = row.cluster.nats
    assert isinstance(nats, NatsCluster)
    await row.warm_up()
    row.evidence["jobs_in_flight_at_fault"] = await jobs_in_flight(row, row.prefills[0])
    leader = await stream_leader(row.cluster.nats_url)
    index = nats.index_of(leader)
    row.strike(f"SIGKILL NATS node n{index} ({leader}), the prefill stream's leader")
    killed_s = time.monotonic()
    await asyncio.to_thread(nats.kill, index)
    row.evidence["killed_node"] = leader
    new_leader = ""

    async def elected() -> bool:
        nonlocal new_leader
        try:
            new_leader = await stream_leader(row.cluster.nats_url)
        except Exception:  # noqa: BLE001 - no leader yet (election), or no answer
            return False
        return new_leader != leader

    deadline = killed_s + 30.0
    while time.monotonic() < deadline and not await elected():
        await asyncio.sleep(0.2)
    row.evidence["new_leader"] = new_leader or None
    row.evidence["new_leader_after_s"] = round(time.monotonic() - killed_s, 1)
    row.note(f"stream leader now {new_leader or 'unknown'}")
    down_s = max_lease_s(row.decode.config.lease) + 2.0
    await asyncio.sleep(max(0.0, killed_s + down_s - time.monotonic()))
    await asyncio.to_thread(nats.start_node, index)  # the workload ran on two nodes
    row.note(f"node n{index} restarted and rejoined")


async def invalid_reload(row: Row) -> None:
    await row.warm_up(0.3)
    checks = []
    for daemon, dotted, value in ((row.decode, "drain_grace_s", -10),
                                  (row.decode, "prefill.transfer_timeout_s", 0),
                                  (row.prefills[0], "lease.base_s", 0)):
        before = await get_config(daemon.address)
        row.strike(f"{daemon.worker_id}: wrote {dotted}: {value} and called Admin/Reload")
        write_config_text(daemon.config_path, config_with(daemon.config, dotted, value))
        reply = await reload_config(daemon.address)
        after = await get_config(daemon.address)
        checks.append({"worker": daemon.worker_id, "field": dotted, "value": value,
                       "error": reply.error,
                       "config_unchanged": after.config_yaml == before.config_yaml
                       and after.config_hash == before.config_hash})
        write_config_text(daemon.config_path, config_to_yaml(daemon.config))
        restored = await reload_config(daemon.address)
        if restored.error:
            row.note(f"{daemon.worker_id}: the restored file was refused: {restored.error}")
    row.evidence["reloads"] = checks


async def pool_pressure(row: Row) -> None:
    """The tiny pool is in force from the start; record how full it got while the
    requests before the gate ran (pages held or quarantined, requests waiting)."""
    row.strike(f"{row.decode.worker_id} has a pool of "
               f"{row.decode.config.engine.num_pages} pages")
    peak_used, max_waiting, total = 0, 0, 0
    while row.progress.num_done < row.gate_index:
        status = await get_status(row.decode.address, timeout_s=1.0)
        if status is not None:
            total = status.num_pages_total
            peak_used = max(peak_used, status.num_pages_used + status.num_pages_quarantined)
            max_waiting = max(max_waiting, status.num_waiting)
        await asyncio.sleep(0.1)
    row.evidence |= {"pages_total": total, "peak_pages_held": peak_used,
                     "max_waiting": max_waiting}


async def from_the_start(row: Row) -> None:
    """Config-level faults: in force for every request of the row."""
    row.strike("in force from the first request")


async def skewed_clock(row: Row) -> None:
    """In force from the first request (the decode worker's measurement of the skewed
    clock is in every row's `peer_clocks`)."""
    prefill = row.prefills[0]
    offset_s = prefill.config.faults.clock_offset_s
    row.strike(f"{prefill.worker_id}'s clock runs {offset_s:+.1f} s off")


FAULTS: dict[str, Fault] = {f.name: f for f in (
    Fault("duplicate_ids", from_the_start, duplicate_every=4),
    Fault("invalid_reload", invalid_reload),
    Fault("prefill_stop", prefill_stop),
    Fault("prefill_kill", prefill_kill),
    Fault("nats_restart", nats_restart),
    Fault("decode_restart_same_id", decode_restart_same_id),
    Fault("two_prefill_one_killed", two_prefill_one_killed,
          prefills=("prefill-0", "prefill-1")),
    Fault("transfer_failure", from_the_start, prefills=("prefill-transferfail",)),
    Fault("clock_offset_behind", skewed_clock, prefills=("prefill-behind",)),
    Fault("clock_offset_ahead", skewed_clock, prefills=("prefill-ahead",)),
    Fault("corrupt_page", from_the_start, decode="decode-checksum",
          prefills=("prefill-corrupt",)),
    Fault("pool_exhausted", pool_pressure, decode="decode-smallpool"),
    Fault("nats_node_kill", nats_node_kill, nats_nodes=3),
)}
