"""The simulator against reality (issue 13 item 6): one short trace replayed live on a
`splitserve up` cluster and in `splitserve simulate` with the same cost profile and the
same static pools; TTFT p50/p99 and throughput side by side, with the sim/live ratios and
whether each lies within ±25%.

Trace: the first `--num-requests` arrivals of the Azure conversation trace
(../shared/traces), prompt and output lengths divided by `--length-scale` (the trace
comes from a far larger model than SmolLM2 on one core), arrival gaps stretched by
each `--time-scales` value (default a light load and one 2.4x heavier; both below
this cluster's capacity, so throughput follows the arrivals and the check that counts
is TTFT's). Prompts are random token ids (no
prefix-cache hits); EOS ignored, so every request makes its trace's output length.

Live: 1 prefill + 1 decode worker, each pinned to its own core with one torch thread
(the profile is measured that way: one instance per core), the router (least loaded;
one decode worker here anyway) in front; no planner. Sim: the same P:D, the routing
thresholds the workers use, the profile file (`--profile`, default the shipped
configs/profile-smollm2-cpu.yaml; `--measure` measures a fresh one first, on this box,
in this run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from serve_interference import Request, Result, run_one

from splitserve.config.daemon import ClusterConfig, LeaseConfig, WorkerConfig
from splitserve.config.planner import PlannerConfig
from splitserve.config.router import RouterConfig
from splitserve.config.schema import EngineConfig
from splitserve.daemons.ports import cluster_ports
from splitserve.daemons.up import LocalCluster
from splitserve.planner.profile import Profile, load_profile
from splitserve.planner.sim import SimSettings, simulate
from splitserve.planner.trace import Trace, TraceScaling, load_trace, scale_trace
from splitserve.routing.offload import RoutingConfig
from splitserve.rpc import generation_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_conversation_2023.csv"
VOCAB_LOW, VOCAB_HIGH = 17, 49152
TOLERANCE = 0.25


def short_trace(args: argparse.Namespace, time_scale: float) -> Trace:
    full = scale_trace(load_trace(args.trace), TraceScaling(
        length_scale=args.length_scale, time_scale=time_scale))
    n = args.num_requests
    return Trace(full.t_s[:n] - full.t_s[0], full.prompt_tokens[:n], full.output_tokens[:n],
                 f"{full.description}; first {n} requests")


def routing(args: argparse.Namespace) -> RoutingConfig:
    return RoutingConfig(prefill_length_threshold=args.threshold,
                         moderate_length_threshold=args.threshold)


def live(trace: Trace, args: argparse.Namespace) -> list[Result]:
    rng = random.Random(0)
    requests = [Request(float(t), [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(int(p))],
                        int(o)) for t, p, o in zip(trace.t_s, trace.prompt_tokens,
                                                   trace.output_tokens)]
    worker = WorkerConfig(engine=EngineConfig(kv_cache_memory_mb=512),
                          routing=routing(args), log_level="WARNING",
                          lease=LeaseConfig(base_s=20.0, per_token_ms=10.0))
    cluster = ClusterConfig(
        **cluster_ports(2), num_decode_workers=1, num_prefill_workers=1, worker=worker,
        pin_cores=True, secure=False,
        router_settings=RouterConfig(balance="least_loaded", log_level="WARNING"))
    with tempfile.TemporaryDirectory(prefix="splitserve-validate-") as state_dir:
        local = LocalCluster(replace(cluster, state_dir=state_dir))
        local.start()
        try:
            assert local.router is not None
            return asyncio.run(_drive(local.router.config.grpc_address, requests))
        finally:
            local.stop()


async def _drive(address: str, requests: list[Request]) -> list[Result]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        t0 = time.monotonic() + 0.5
        return list(await asyncio.gather(*(run_one(stub, r, t0) for r in requests)))


def stats(ttft_s: np.ndarray, finish_s: np.ndarray, num_tokens: np.ndarray) -> dict:
    done = ~np.isnan(finish_s)
    span = float(np.nanmax(finish_s)) if done.any() else float("nan")
    return {"num_finished": int(done.sum()),
            "ttft_ms": {"p50": round(float(np.nanpercentile(ttft_s, 50)) * 1e3, 1),
                        "p99": round(float(np.nanpercentile(ttft_s, 99)) * 1e3, 1)},
            "throughput_rps": round(float(done.sum()) / span, 4),
            "output_tokens_per_s": round(float(num_tokens[done].sum()) / span, 2)}


def replay(trace: Trace, time_scale: float, profile: Profile,
           args: argparse.Namespace) -> dict:
    """The trace live, then in the simulator; both summaries and the sim/live ratios."""
    results = live(trace, args)
    live_ttft = np.array([r.ttft_s for r in results])
    live_finish = np.array([a + r.ttft_s + (r.tpot_s * (r.num_tokens - 1)
                                            if r.num_tokens > 1 else 0.0)
                            if not r.error else np.nan for a, r in zip(trace.t_s, results)])
    live_stats = stats(live_ttft, live_finish, np.array([r.num_tokens for r in results]))
    sim = simulate(trace, SimSettings(replace(PlannerConfig(), routing=routing(args)), profile,
                                      static=(1, 1)))
    sim_stats = stats(sim.first_s - sim.arrival_s, sim.finish_s, sim.output_tokens)

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    ratios = {"ttft_p50": ratio(sim_stats["ttft_ms"]["p50"], live_stats["ttft_ms"]["p50"]),
              "ttft_p99": ratio(sim_stats["ttft_ms"]["p99"], live_stats["ttft_ms"]["p99"]),
              "throughput": ratio(sim_stats["output_tokens_per_s"],
                                  live_stats["output_tokens_per_s"])}
    return {"trace": trace.description, "time_scale": time_scale, "num_requests": len(trace),
            "offered_rps": round(len(trace) / max(trace.span_s, 1e-9), 3),
            "live": live_stats, "sim": sim_stats,
            "errors": sorted({r.error for r in results if r.error})[:5],
            "ratios_sim_over_live": ratios,
            "within_25_percent": {k: v is not None and abs(v - 1) <= TOLERANCE
                                  for k, v in ratios.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--num-requests", type=int, default=80)
    ap.add_argument("--length-scale", type=float, default=8.0)
    ap.add_argument("--time-scales", type=float, nargs="+", default=[6.0, 2.5],
                    help="one replay per value (arrival gaps x this)")
    ap.add_argument("--threshold", type=int, default=128,
                    help="prefill_length_threshold (and moderate) of the decode worker")
    ap.add_argument("--profile", default=str(ROOT / "configs" / "profile-smollm2-cpu.yaml"))
    ap.add_argument("--measure", action="store_true",
                    help="measure a fresh profile first (splitserve profile)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    profile_path = args.profile
    if args.measure:
        profile_path = str(Path(tempfile.mkdtemp()) / "profile.yaml")
        subprocess.run([sys.executable, "-m", "splitserve.cli", "profile", "--out",
                        profile_path], check=True)
    profile = load_profile(profile_path)
    replays = [replay(short_trace(args, scale), scale, profile, args)
               for scale in args.time_scales]
    out = {
        "benchmark": "sim_validate",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "pools": "1 prefill : 1 decode, one core each", "routing_threshold": args.threshold,
        "profile": profile_path, "replays": replays,
        "all_within_25_percent": all(all(r["within_25_percent"].values()) for r in replays),
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
