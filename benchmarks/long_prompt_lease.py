"""A long prompt on a busy box: does it go remote in one attempt, with a lease that fits?

Against a running cluster (`make run`: decode-0 on 127.0.0.1:50051, logs under
state/), one invocation sends the same-length prompt twice, each with fresh random
token ids (no prefix-cache hits):
(a) idle: the cluster alone (the baseline);
(b) busy: `--stress` processes (default: one per core) spin in a Python loop meanwhile.
Before each, it waits until the decode worker holds no pages (the landing pages of an
accepted remote prefill stay fenced until its lease ends). For each it reports the Timing (TTFT, path, attempts), the decode worker's counter
deltas (remote attempts, lease expiries, renewals, declined jobs, fallbacks) and the
lease of each attempt and its renewals, read from the workers' logs (`--decode-log`,
`--prefill-log`). `--json` prints one object with the busy/idle TTFT ratio.

    .venv/bin/python benchmarks/long_prompt_lease.py --tokens 6000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import time
from pathlib import Path
from typing import Any

from splitserve import client

COUNTERS = ("num_remote_attempts", "num_lease_expiries", "num_lease_renewals",
            "num_declined_jobs", "num_fallbacks", "num_local_prefills", "num_remote_prefills")
PUBLISHED = re.compile(r"request \S+ \((?P<id>[^)]*)\) attempt (?P<attempt>\d+): published, "
                       r"\d+ prompt tokens, lease (?P<lease>[\d.]+) s")
RENEWED = re.compile(r"job (?P<job>\S+):(?P<attempt>\d+): lease renewed by (?P<by>[\d.]+) s")


def spin() -> None:
    while True:
        pass


async def counters(target: str, call: client.CallOptions) -> dict[str, int]:
    status = await client.admin_status(target, call)
    return {name: getattr(status.counters, name) for name in COUNTERS}


def lease_lines(request_id: str, decode_log: Path, prefill_log: Path,
                decode_from: int, prefill_from: int) -> dict[str, Any]:
    """The attempts' initial leases (decode log) and the renewals (prefill log) since the
    given offsets; the prefill log names jobs by internal id, taken from the decode log."""
    text = decode_log.read_text(errors="replace")[decode_from:]
    leases = [float(m["lease"]) for m in PUBLISHED.finditer(text) if m["id"] == request_id]
    renewals = [float(m["by"]) for m in RENEWED.finditer(
        prefill_log.read_text(errors="replace")[prefill_from:])]
    return {"initial_lease_s": leases, "renewed_by_s": renewals,
            "granted_total_s": (leases[-1] if leases else 0.0) + sum(renewals)}


async def pages_all_free(target: str, call: client.CallOptions,
                         timeout_s: float = 300.0) -> float:
    """Wait until the decode worker holds no pages (an accepted remote prefill's landing
    pages stay fenced until its lease ends: a late duplicate write may still land), so
    the next long prompt finds room for its landing pages; the seconds waited."""
    start = time.monotonic()
    while True:
        status = await client.admin_status(target, call)
        if status.num_pages_free == status.num_pages_total:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{target}: pages still held after {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def one(args: argparse.Namespace, label: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    request_id = f"long-{label}-{os.getpid()}-{seed}"
    request = client.generate_request(
        token_ids=[rng.randrange(32, 256) for _ in range(args.tokens)], max_tokens=8,
        temperature=0.0, ignore_eos=True, request_id=request_id)
    offsets = (args.decode_log.stat().st_size, args.prefill_log.stat().st_size)
    before = await counters(args.target, args.call)
    start = time.monotonic()
    timing = None
    async for chunk in client.stream_generate(args.target, request, timeout_s=600,
                                              security=args.call.security):
        if chunk.HasField("timing"):
            timing = chunk.timing
    wall_s = time.monotonic() - start
    assert timing is not None
    await asyncio.sleep(0.5)  # log lines flushed
    after = await counters(args.target, args.call)
    return {"ttft_ms": round(timing.ttft_ms, 1), "queue_ms": round(timing.queue_ms, 1),
            "prefill": timing.prefill, "num_attempts": timing.num_attempts,
            "num_prompt_tokens": timing.num_prompt_tokens, "wall_s": round(wall_s, 2),
            "counters": {k: after[k] - before[k] for k in COUNTERS},
            "lease": lease_lines(request_id, args.decode_log, args.prefill_log, *offsets)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    await pages_all_free(args.target, args.call)
    idle = await one(args, "idle", args.seed)
    waited_s = await pages_all_free(args.target, args.call)
    procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.stress)]
    for proc in procs:
        proc.start()
    try:
        await asyncio.sleep(2.0)
        busy = await one(args, "busy", args.seed + 1)
    finally:
        for proc in procs:
            proc.kill()
    return {"tokens": args.tokens, "stress_processes": args.stress, "cpus": os.cpu_count(),
            "idle": idle, "busy": busy, "waited_for_pages_s": round(waited_s, 1),
            "ttft_ratio_busy_over_idle": round(busy["ttft_ms"] / idle["ttft_ms"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--stress", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--decode-log", type=Path, default=Path("state/decode-0.log"))
    parser.add_argument("--prefill-log", type=Path, default=Path("state/prefill-0.log"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--certs", type=Path, default=Path("state/certs"),
                        help="make run's TLS CA and admin token (ignored when absent)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    secure = (args.certs / "ca.pem").exists()
    args.call = client.CallOptions(client.ClientSecurity.from_files(
        str(args.certs / "ca.pem"), token_file=str(args.certs / "admin.token"))
        if secure else client.PLAINTEXT)
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
