"""Overload: the router's admission control on vs off, offered load stepped to 5× capacity.

Workload (seeded): Poisson arrivals in steps of `--step-s` seconds at `--steps` × the
measured capacity (default 0.5, 1, 2, 3, 5); priorities 20% high, 50% normal, 30% low;
prompts of 64–192 random token ids (no prefix hits), 24 output tokens (EOS ignored),
streamed through `POST /v1/completions` with `x-priority`.

Capacity: before the runs, `--warmup` requests at once through a fresh cluster; their
count / the time they took (requests per second the 2 workers complete when saturated).

Two runs, each on a fresh local cluster (nats, 2 decode workers pinned to a core each,
remote prefill off, a router): `qos.admission: true` (the defaults: low refused above an
estimated 2 s TTFT, normal above 8 s, high never) and `false`. A request is *good* when
it completes with TTFT within its class's SLO (high 2 s, normal 8 s, low 20 s); refused
(429) and unfinished requests are not. Reported per run and class: offered, good,
refused, TTFT p50/p99 of completed requests; goodput (good / s over the arrival
window). `--json`: one object with the ratio on / off and the issue's goals (high
TTFT p99 within its SLO with admission on, goodput ratio ≥ 3×).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass

import openai

from splitserve.config.daemon import ClusterConfig, WorkerConfig
from splitserve.config.router import QosConfig, RouterConfig
from splitserve.config.schema import EngineConfig
from splitserve.daemons.up import LocalCluster
from splitserve.model.loader import default_model_path
from splitserve.queue.broker import find_free_port
from splitserve.routing.offload import RoutingConfig

SLO_S = {"high": 2.0, "normal": 8.0, "low": 20.0}
MIX = (("high", 0.2), ("normal", 0.5), ("low", 0.3))
VOCAB_LOW, VOCAB_HIGH = 17, 49152


@dataclass
class Request:
    arrival_s: float
    priority: str
    prompt: list[int]


@dataclass
class Outcome:
    request: Request
    ttft_s: float | None = None
    done: bool = False
    refused: bool = False


def workload(capacity_rps: float, args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)
    requests, start = [], 0.0
    for factor in args.steps:
        t, rate = start, factor * capacity_rps
        while True:
            t += rng.expovariate(rate)
            if t >= start + args.step_s:
                break
            priority = rng.choices([p for p, _ in MIX], [w for _, w in MIX])[0]
            prompt = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(64, 192))]
            requests.append(Request(t, priority, prompt))
        start += args.step_s
    return requests


async def send(client: openai.AsyncOpenAI, model: str, request: Request, t0: float,
               max_tokens: int) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.monotonic()))
    outcome, sent = Outcome(request), time.monotonic()
    try:
        stream = await client.completions.create(
            model=model, prompt=request.prompt, max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
            extra_headers={"x-priority": request.priority})
        async for chunk in stream:
            if outcome.ttft_s is None and chunk.choices and chunk.choices[0].text:
                outcome.ttft_s = time.monotonic() - sent
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome.done = True
    except openai.RateLimitError:
        outcome.refused = True
    except (TimeoutError, openai.APIError):
        pass
    return outcome


async def drive(base_url: str, requests: list[Request], args: argparse.Namespace
                ) -> list[Outcome]:
    model = default_model_path().stem
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                  timeout=args.timeout_s) as client:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(send(client, model, r, t0, args.max_tokens)
                                           for r in requests)))


async def measure_capacity(base_url: str, args: argparse.Namespace) -> float:
    rng = random.Random(args.seed + 1)
    burst = [Request(0.0, "normal", [rng.randrange(VOCAB_LOW, VOCAB_HIGH)
                                     for _ in range(128)]) for _ in range(args.warmup)]
    start = time.monotonic()
    outcomes = await drive(base_url, burst, args)
    return sum(o.done for o in outcomes) / (time.monotonic() - start)


def cluster_config(state_dir: str, admission: bool) -> ClusterConfig:
    worker = WorkerConfig(engine=EngineConfig(kv_cache_memory_mb=1024, max_num_seqs=32),
                          routing=RoutingConfig(enable_remote_prefill=False),
                          log_level="WARNING")
    return ClusterConfig(
        state_dir=state_dir, nats_port=find_free_port(), base_grpc_port=find_free_port(),
        base_metrics_port=0, num_decode_workers=2, num_prefill_workers=0, worker=worker,
        pin_cores=True, secure=False, router_http_port=find_free_port(),
        router_grpc_port=find_free_port(), router_settings=RouterConfig(
            qos=QosConfig(admission=admission), log_level="WARNING"))


def run(admission: bool, capacity: float | None, args: argparse.Namespace
        ) -> tuple[float, list[Outcome]]:
    with tempfile.TemporaryDirectory() as state:
        local = LocalCluster(cluster_config(state, admission))
        try:
            local.start()
            assert local.router is not None
            url = local.router.base_url
            if capacity is None:
                capacity = asyncio.run(measure_capacity(url, args))
            return capacity, asyncio.run(drive(url, workload(capacity, args), args))
        finally:
            local.stop()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)


def summary(outcomes: list[Outcome], window_s: float) -> dict[str, object]:
    def good(o: Outcome) -> bool:
        return o.done and o.ttft_s is not None and o.ttft_s <= SLO_S[o.request.priority]

    report: dict[str, object] = {}
    for priority in SLO_S:
        mine = [o for o in outcomes if o.request.priority == priority]
        ttft = [o.ttft_s for o in mine if o.done and o.ttft_s is not None]
        report[priority] = {"offered": len(mine), "good": sum(good(o) for o in mine),
                            "refused": sum(o.refused for o in mine),
                            "unfinished": sum(not o.done and not o.refused for o in mine),
                            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99)}
    report["goodput_rps"] = round(sum(good(o) for o in outcomes) / window_s, 4)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 1, 2, 3, 5])
    parser.add_argument("--step-s", type=float, default=20.0)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    capacity, on = run(True, None, args)
    _, off = run(False, capacity, args)
    window_s = args.step_s * len(args.steps)
    result_on, result_off = summary(on, window_s), summary(off, window_s)
    ratio = result_on["goodput_rps"] / max(result_off["goodput_rps"], 1e-9)  # type: ignore[operator]
    high_p99 = result_on["high"]["ttft_p99_s"]  # type: ignore[index]
    report = {"capacity_rps": round(capacity, 4), "workload": vars(args) | {"json": None},
              "admission_on": result_on, "admission_off": result_off,
              "ratio": {"goodput": round(ratio, 3)},
              "goals": {"high_ttft_p99_within_slo": high_p99 is not None
                        and high_p99 <= SLO_S["high"], "goodput_ratio_min": 3.0},
              "goals_met": bool(high_p99 is not None and high_p99 <= SLO_S["high"]
                                and ratio >= 3.0)}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
