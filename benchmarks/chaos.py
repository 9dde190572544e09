"""Chaos suite (issue 9): no wrong token, no lost or duplicated request, nothing leaked,
under every fault.

    .venv/bin/python benchmarks/chaos.py --json [--requests N] [--faults a,b] [--seed S]

For each fault, one seeded workload of `--requests` logical requests (default 1,000)
runs against a real local cluster (nats-server processes, decode and prefill worker
daemons as subprocesses, NIXL transfers, gRPC clients) while the fault strikes, with
`--concurrency` requests in flight. Prompts are mostly short (local prefill); one in
five is long (150-400 tokens, at least 48 of them uncached, so it goes remote); one in
ten is sampled with a seed, the rest greedy; 4-16 output tokens. Every output is
compared token for token with the single-process engine (`Engine` on the same model
and engine config, in this process; each distinct prompt computed once).

Definitions (per logical request; each has a unique caller `request_id`):
- *lost*: the client got no complete output (a stream ending in a chunk with finish
  reason STOP or LENGTH) within `--deadline` seconds of its first call, after retrying
  what a real client retries: UNAVAILABLE (the decode worker is draining, dead or
  restarting: same address, with backoff), RESOURCE_EXHAUSTED (backoff), ALREADY_EXISTS
  (its id is still in flight) and a stream that ended without its final chunk
  (`incomplete_streams`). Any other status code ends it: lost.
- *wrong*: a complete output differs from the reference, a stream cut by a fault
  delivered tokens that are not a prefix of the reference, or a chunk named another
  request id.
- *duplicated*: more than one complete output for the request; a stream with more
  tokens than max_tokens, a chunk repeating the previous one, or chunks after the
  final one; or (duplicate_ids) a duplicate send served while its original was in
  flight, which must get ALREADY_EXISTS instead (`refused`), and is then re-sent once
  the original has finished and must complete like any request.
- *leaked_pages*: num_pages_used + num_pages_quarantined over the row's decode
  worker(s) (Admin/GetStatus) once every request is over and the leases have expired:
  polled for up to the longest lease + skew margin + 5 s.
- *recovery_s*: from the moment the fault struck to the first request completed after
  it (`recovery_remote_s`: the first one prefilled remotely).
- *counters*: the Admin/GetStatus counters of the row's workers (decode and prefill
  summed per role; changes over the row, across restarts up to each killed life's last
  observation, taken just before the kill).

Rows (`--faults` picks some): duplicate_ids, invalid_reload, prefill_stop,
prefill_kill, nats_restart, decode_restart_same_id, two_prefill_one_killed,
transfer_failure, clock_offset_behind, clock_offset_ahead, corrupt_page,
pool_exhausted, nats_node_kill (chaos_faults.py says what each does). Rows reuse the
cluster where the fault allows: workers are only started when a row needs a worker
(variant) that is not running. Prints one JSON object (machine, settings, rows) with
`--json`, a table on stderr always; exits 1 if any row has lost, wrong, duplicated or
leaked > 0 (or could not run). Worker logs stay in `--workdir` when a row fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from chaos_client import Client, Progress, drive
from chaos_cluster import ENGINE, LEASE, ROUTING, Cluster, CounterLedger, get_status
from chaos_faults import DECODE_VARIANTS, FAULTS, PREFILL_VARIANTS
from chaos_report import JsonRow, ReferenceMap, is_failed, summarize, table
from chaos_row import GATE, Fault, Row
from chaos_workload import (
    LONG_EVERY,
    LONG_TOKENS,
    PromptBank,
    Request,
    compute_references,
    make_requests,
    reference_engine,
)

# the longest an attempt's landing pages stay fenced (its lease at the cap, renewals
# included, + the margin), + 5 s; rows with a longer lease wait for theirs
LEAK_WAIT_S = LEASE.cap_s + LEASE.skew_margin_s + 5


class Clusters:
    """The running cluster, reshaped for each row: the broker is replaced when the
    number of NATS nodes changes, unneeded prefill workers stop (they would take jobs),
    missing or dead workers start. Each worker id keeps its config (and port)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cluster: Cluster | None = None
        self.num_clusters = 0

    def prepare(self, fault: Fault) -> Cluster:
        if self.cluster is None or self.cluster.replicas != fault.nats_nodes:
            self.close()
            self.num_clusters += 1
            self.cluster = Cluster(self.workdir / f"cluster-{self.num_clusters}",
                                   fault.nats_nodes)
        cluster = self.cluster
        wanted = {fault.decode: ("decode", DECODE_VARIANTS[fault.decode])} | {
            p: ("prefill", PREFILL_VARIANTS[p]) for p in fault.prefills}
        cluster.stop([w for w, d in cluster.daemons.items()
                      if w not in wanted and (d.config.role == "prefill" or not d.alive)])
        missing = []
        for worker_id, (role, overrides) in wanted.items():
            daemon = cluster.daemons.get(worker_id)
            if daemon is None:
                missing.append(cluster.config(role, worker_id, **overrides))
            elif not daemon.alive:
                missing.append(daemon.config)
        cluster.start(missing)
        return cluster

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


async def run_row(fault: Fault, cluster: Cluster, requests: list[Request],
                  references: ReferenceMap, args: argparse.Namespace) -> JsonRow:
    decode = cluster.daemons[fault.decode]
    num_requests = sum(not r.duplicate for r in requests)
    row = Row(fault.name, cluster, decode, [cluster.daemons[p] for p in fault.prefills],
              num_requests, int(GATE * num_requests), Progress(), CounterLedger())
    await row.ledger.observe(row.daemons)
    client = Client(decode.address, args.deadline)
    fault_error = ""

    async def strike() -> None:
        nonlocal fault_error
        try:
            await fault.script(row)
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            fault_error = f"fault script failed: {exc!r}"
            row.note(traceback.format_exc(limit=3))
        finally:
            row.fault_over()

    row.t0 = time.monotonic()
    outcomes, _ = await asyncio.gather(
        drive(client, requests, args.concurrency, row.gate_index, row.gate, row.progress),
        strike())
    await client.close()
    workload_s = time.monotonic() - row.t0
    leaked, prefill_used = await wait_for_pages(row)
    await row.ledger.observe(row.daemons)
    row.evidence["peer_clocks"] = await peer_clocks(row)
    result: JsonRow = {"fault": fault.name}
    result |= summarize(outcomes, references, row.fault_s, row.fault_end_s)
    result |= {"leaked_pages": leaked, "prefill_pages_used": prefill_used,
               "workload_s": round(workload_s, 1),
               "wall_s": round(time.monotonic() - row.t0, 1),
               "workers": {d.worker_id: d.config.role for d in row.daemons},
               "counters": row.ledger.totals(), "evidence": row.evidence, "notes": row.notes}
    if leaked is None:
        fault_error += " a decode worker did not answer GetStatus after the workload"
    if fault_error:
        result["error"] = fault_error.strip()
    return result


async def wait_for_pages(row: Row) -> tuple[int | None, int | None]:
    """Pages used + quarantined on every running decode worker once the leases have
    expired (None: one did not answer), and the row's prefill workers' pages in use."""
    lease = row.decode.config.lease
    deadline = time.monotonic() + max(LEAK_WAIT_S, lease.cap_s + lease.skew_margin_s + 5)
    while True:
        statuses = await asyncio.gather(*(get_status(d.address)
                                          for d in row.cluster.role("decode")))
        leaked = None if None in statuses else sum(
            s.num_pages_used + s.num_pages_quarantined for s in statuses if s is not None)
        if leaked == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    prefill = [await get_status(p.address) for p in row.prefills if p.alive]
    return leaked, sum(s.num_pages_used for s in prefill if s is not None)


async def peer_clocks(row: Row) -> list[dict[str, object]]:
    """The decode worker's measurement of the row's prefill workers' clocks."""
    status = await get_status(row.decode.address)
    ids = {p.worker_id for p in row.prefills}
    return [] if status is None else [
        {"worker_id": c.worker_id, "offset_min_ms": round(c.offset_min_ms, 1),
         "offset_max_ms": round(c.offset_max_ms, 1), "excluded": c.excluded}
        for c in status.peer_clocks if c.worker_id in ids]


def build_workloads(faults: list[Fault], args: argparse.Namespace
                    ) -> tuple[dict[str, list[Request]], ReferenceMap, float]:
    started = time.monotonic()
    engine = reference_engine(ENGINE)
    assert engine.tokenizer is not None
    bank = PromptBank(engine.tokenizer, args.seed, num_bodies=max(8, args.requests // 20))
    workloads = {f.name: make_requests(bank, f.name, args.requests, args.seed,
                                       duplicate_every=f.duplicate_every) for f in faults}
    references = compute_references(engine, [r for w in workloads.values() for r in w])
    return workloads, references, time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--requests", type=int, default=1000, help="logical requests per fault")
    ap.add_argument("--faults", default="all", help=f"comma-separated: {', '.join(FAULTS)}")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--deadline", type=float, default=120.0,
                    help="seconds a request may take, retries included, before it is lost")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="worker configs and logs (default: a temporary directory)")
    args = ap.parse_args()
    names = list(FAULTS) if args.faults == "all" else args.faults.split(",")
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        ap.error(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    faults = [FAULTS[n] for n in names]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="splitserve-chaos-"))
    started = time.monotonic()
    load_before = os.getloadavg()
    workloads, references, reference_s = build_workloads(faults, args)
    print(f"references: {len(references)} distinct prompts in {reference_s:.0f} s; "
          f"logs in {workdir}", file=sys.stderr)
    rows = asyncio.run(run_rows(faults, workloads, references, workdir, args))
    out = {
        "benchmark": "chaos",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"requests_per_fault": args.requests, "concurrency": args.concurrency,
                     "deadline_s": args.deadline, "seed": args.seed, "faults": names,
                     "long_every": LONG_EVERY, "long_prompt_tokens": list(LONG_TOKENS),
                     "sent_before_fault_ends": GATE,
                     "sampled_fraction": 0.1, "max_tokens": [4, 8, 12, 16],
                     "lease": asdict(LEASE), "routing": asdict(ROUTING),
                     "engine": asdict(ENGINE), "leak_wait_s": LEAK_WAIT_S,
                     "num_distinct_prompts": len(references),
                     "reference_s": round(reference_s, 1)},
        "rows": rows,
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(table(rows), file=sys.stderr)
    print(f"total {out['wall_s']} s", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    failed = any(is_failed(r) for r in rows)
    if failed:
        print(f"FAILED; worker logs kept in {workdir}", file=sys.stderr)
    elif args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


async def run_rows(faults: list[Fault], workloads: dict[str, list[Request]],
                   references: ReferenceMap, workdir: Path,
                   args: argparse.Namespace) -> list[JsonRow]:
    clusters = Clusters(workdir)
    rows = []
    try:
        for fault in faults:
            print(f"--- {fault.name}", file=sys.stderr)
            try:
                cluster = await asyncio.to_thread(clusters.prepare, fault)
                rows.append(await run_row(fault, cluster, workloads[fault.name], references,
                                          args))
            except Exception as exc:  # noqa: BLE001 - one broken row must not hide the rest
                traceback.print_exc()
                rows.append({"fault": fault.name, "error": repr(exc)})
            print(table(rows[-1:]), file=sys.stderr)
    finally:
        await asyncio.to_thread(clusters.close)
    return rows


if __name__ == "__main__":
    sys.exit(main())
