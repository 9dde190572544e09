"""The planner live on this box: a traffic shift served with role flips vs a fixed split.

Workload (seeded, one schedule for both runs), three phases of `--phase-s` seconds each:
1. chat: short prompts (32-64 tokens), 32 output tokens, at `--rate` req/s;
2. summarization burst: long prompts (`--long-min`-`--long-max` tokens, all above the
   routing threshold: they go to the prefill pool), 16 output tokens, at `--long-rate`
   (the default asks ~380 prompt tokens/s: more than one prefill worker on one core
   prefills here, less than two);
3. reasoning: short prompts with long outputs (192 tokens).
Prompts are random token ids, all distinct (no prefix-cache hits); EOS ignored.

Runs, one after the other in one invocation, the same cluster (`splitserve up`: NATS,
3 workers pinned to the cores round-robin, one torch thread each, and the router, whose
gRPC Generation every request goes through):
(a) fixed: 1 prefill + 2 decode workers, as `make run` has them;
(b) planner: the same start, plus `splitserve planner` in `auto` with the `role` actuator:
    it may flip workers between the roles as the phases change (its History is in the
    output: which flips, when).
Reported per run and per phase: TTFT p50/p99, TPOT p50/p99, goodput (requests/s meeting
the SLOs below), errors; and the planner/fixed ratios of TTFT p99 and goodput overall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import grpc
from serve_interference import Request, Result, Slo, run_one, summarize

from splitserve.config.daemon import ClusterConfig, LeaseConfig, WorkerConfig
from splitserve.config.planner import (
    ActuatorConfig,
    PlannerConfig,
    ScalingConfig,
    ThresholdConfig,
)
from splitserve.config.schema import EngineConfig
from splitserve.daemons.ports import cluster_ports
from splitserve.daemons.up import LocalCluster
from splitserve.routing.offload import RoutingConfig
from splitserve.rpc import generation_pb2_grpc

VOCAB_LOW, VOCAB_HIGH = 17, 49152
PHASES = ("chat", "summarize", "reason")


def workload(args: argparse.Namespace) -> list[tuple[str, Request]]:
    rng = random.Random(args.seed)
    requests = []
    for i, phase in enumerate(PHASES):
        rate = args.long_rate if phase == "summarize" else args.rate
        t = i * args.phase_s + rng.expovariate(rate)
        while t < (i + 1) * args.phase_s:
            if phase == "summarize":
                n, out = rng.randint(args.long_min, args.long_max), 16
            else:
                n, out = rng.randint(32, 64), 32 if phase == "chat" else 192
            prompt = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]
            requests.append((phase, Request(t, prompt, out)))
            t += rng.expovariate(rate)
    return requests


def cluster_config(state_dir: str, with_planner: bool, args: argparse.Namespace) -> ClusterConfig:
    worker = WorkerConfig(
        engine=EngineConfig(kv_cache_memory_mb=512, max_num_seqs=32),
        routing=RoutingConfig(prefill_length_threshold=256, moderate_length_threshold=256),
        lease=LeaseConfig(base_s=20.0, per_token_ms=10.0), log_level="WARNING")
    planner = PlannerConfig(
        mode="auto", interval_s=2.0, stats_max_age_s=10.0, log_level="INFO",
        actuator=ActuatorConfig(kind="role", drain_grace_s=30.0),
        scaling=ScalingConfig(target_decode_tokens_per_s=args.target_tps, min_prefill=1,
                              min_decode=1, backlog_drain_s=2.0, scale_up_cooldown_s=5.0,
                              scale_down_cooldown_s=15.0, ttft_slo_ms=args.slo_ttft_s * 1e3,
                              tpot_slo_ms=args.slo_tpot_s * 1e3),
        thresholds=ThresholdConfig(enabled=False))  # the split is what is compared
    return ClusterConfig(
        state_dir=state_dir, **cluster_ports(3), num_decode_workers=2, num_prefill_workers=1,
        worker=worker, pin_cores=True, secure=False, planner=with_planner,
        planner_settings=planner)


async def drive(address: str, requests: list[tuple[str, Request]]) -> tuple[list[Result], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        t0 = time.monotonic() + 0.5
        results = await asyncio.gather(*(run_one(stub, r, t0) for _, r in requests))
        return list(results), time.monotonic() - t0


def planner_history(local: LocalCluster, grpcurl: str) -> list[dict]:
    if local.planner is None:
        return []
    out = subprocess.run([grpcurl, "-plaintext", "-d", "{}", local.planner.config.grpc_address,
                          "splitserve.v1.Planner/History"], capture_output=True, text=True,
                         timeout=30, check=False)
    if out.returncode != 0:
        return [{"error": out.stderr.strip()}]
    plans = json.loads(out.stdout).get("plans", [])
    return [{"t_unix_s": p.get("timestamp_unix_s"), "actions": p.get("actions", []),
             "roles": {r["role"]: [r.get("current", 0), r.get("target", 0)]
                       for r in p.get("roles", [])}}
            for p in plans if p.get("actions")][::-1]


def run(with_planner: bool, requests: list[tuple[str, Request]],
        args: argparse.Namespace, grpcurl: str) -> dict:
    name = "planner" if with_planner else "fixed"
    with tempfile.TemporaryDirectory(prefix=f"splitserve-{name}-") as state_dir:
        local = LocalCluster(cluster_config(state_dir, with_planner, args))
        local.start()
        try:
            assert local.router is not None
            results, wall_s = asyncio.run(drive(local.router.config.grpc_address, requests))
            history = planner_history(local, grpcurl)
        finally:
            local.stop()
            if args.keep_logs:
                keep = Path(args.keep_logs) / name
                keep.mkdir(parents=True, exist_ok=True)
                for log in Path(state_dir).glob("*.log"):
                    shutil.copy(log, keep / log.name)
    slo = Slo(args.slo_ttft_s, args.slo_ttft_long_s, args.slo_tpot_s)
    by_phase = {phase: summarize([r for (p, _), r in zip(requests, results) if p == phase],
                                 args.phase_s, slo) for phase in PHASES}
    return {"overall": summarize(results, wall_s, slo), "by_phase": by_phase,
            "planner_actions": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=0.75,
                    help="requests per second in the chat and reasoning phases")
    ap.add_argument("--phase-s", type=float, default=40.0, help="seconds per phase")
    ap.add_argument("--long-rate", type=float, default=0.5,
                    help="requests per second in the summarization burst")
    ap.add_argument("--long-min", type=int, default=512)
    ap.add_argument("--long-max", type=int, default=1024)
    ap.add_argument("--target-tps", type=float, default=30.0,
                    help="the planner's target decode tokens/s per decode worker")
    ap.add_argument("--slo-ttft-s", type=float, default=1.5, help="TTFT SLO, short prompts")
    ap.add_argument("--slo-ttft-long-s", type=float, default=10.0, help="... long prompts")
    ap.add_argument("--slo-tpot-s", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-logs", default="", help="copy the daemons' logs here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    grpcurl = str(Path(sys.executable).parent / "grpcurl")
    requests = workload(args)
    fixed = run(False, requests, args, grpcurl)
    planned = run(True, requests, args, grpcurl)

    def ratio(key: str, q: str | None) -> float | None:
        a, b = planned["overall"][key], fixed["overall"][key]
        a, b = (a.get(q), b.get(q)) if q else (a, b)
        return round(a / b, 3) if a and b else None

    out = {
        "benchmark": "planner_live",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "model": "SmolLM2-135M-Instruct fp32, 3 workers pinned round-robin to the cores",
        "workload": {"phases": list(PHASES), "phase_s": args.phase_s, "rate_req_per_s": args.rate,
                     "long_rate_req_per_s": args.long_rate,
                     "seed": args.seed, "num_requests": len(requests),
                     "long_prompt_tokens": f"{args.long_min}-{args.long_max}",
                     "short_prompt_tokens": "32-64", "output_tokens": "chat 32, summarize 16, "
                     "reason 192"},
        "slo": asdict(Slo(args.slo_ttft_s, args.slo_ttft_long_s, args.slo_tpot_s)),
        "fixed": fixed, "planner": planned,
        "ratios_planner_over_fixed": {"ttft_p99": ratio("ttft_s", "p99"),
                                      "tpot_p99": ratio("tpot_s", "p99"),
                                      "goodput": ratio("goodput_req_per_s", None)},
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
