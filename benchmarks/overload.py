"""Overload: the router's admission control on vs off, offered load stepped to 5× capacity.

Workload (seeded): Poisson arrivals in steps of `--step-s` seconds at `--steps` × the
measured capacity (default 0.5, 1, 2, 3, 5); priorities (`--mix`) 10% high, 50%
normal, 40% low: at the 5× step the high class alone is then half the capacity. High
is never refused, so a mix whose high share × the peak factor reaches 1 (20% at 5×,
the default before 2026-12-05) overloads the high class by itself, and no admission
policy can hold its SLO there (measured: high TTFT p99 4.7 s with admission on);
prompts of 64–192 random token ids (no prefix hits), 24 output tokens (EOS ignored),
streamed through `POST /v1/completions` with `x-priority`.

Capacity: before the runs, on the first run's cluster, `--capacity-concurrency`
requests kept in flight (closed loop) for `--capacity-s` seconds after a warm-up: the
requests per second the 2 workers complete when saturated. (A single burst measures
its own ramp-up and tail and underrates the continuous batch by ~2×.)

Up to four runs (`--admission-only`: the first alone; `--baselines`: which others;
`--capacity`: a given capacity, not measured), each on a fresh local cluster (nats, 2
decode workers pinned to a core each, remote prefill off, a router):
- `admission`: `qos.admission: true` (the defaults: low refused above an estimated 20 s
  TTFT, normal above 8 s, high never: each class's SLO) with the priority header, and
  the workers' engines pacing their steps to the TPOT SLOs (`engine.tpot_slo_s`, the
  defaults: high and normal 0.2 s);
- `admission_unpaced`: the same with no pacing (`engine.tpot_slo_s` 0 for every class:
  every step may take `max_num_batched_tokens`, as before a7c34d1);
- `admission_off`: `qos.admission: false`, still with the priority header (the engine
  still orders its queue by priority and paces its steps);
- `no_qos`: `qos.admission: false`, no priority header and no pacing: every request
  is normal to the server, as before QoS existed (the classes still judge the outcome).
A request is *good* when
it completes with TTFT and TPOT within its class's SLOs (the router's defaults: high 2 s
and 0.2 s a token, normal 8 s and 0.2 s, low 20 s and none; TPOT from the stream's
timing and usage: the time after the first token over the tokens after it); refused
(429) and unfinished requests are not: the router's own verdict (router/slo.py). Before
2026-12-06 only TTFT was judged (`goodput_ttft_only_rps`; `tpot_missed`: requests good
but for their TPOT). Reported per run and class: offered, good, refused, late by step (admitted but not good: what admission let through too late),
TTFT p50/p99 of completed requests; goodput (good / s over the arrival
window; also by load step, a request counted in the step it arrived in). `--json`:
one object with the goodput ratios of `admission` to each baseline, over the whole run
and in the last (peak) step, each judged on TTFT and TPOT and on TTFT alone
(`_ttft_only`), and the issue's goals (high TTFT p99 within its SLO with admission on,
goodput ratio ≥ 3× over the whole run), judged against each baseline both ways.
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
from splitserve.config.schema import TPOT_SLO_S, EngineConfig, PerClass
from splitserve.daemons.ports import cluster_ports
from splitserve.daemons.up import LocalCluster
from splitserve.model.loader import default_model_path
from splitserve.priority import PRIORITIES
from splitserve.router.slo import SloOutcome, judge
from splitserve.routing.offload import RoutingConfig

QOS = QosConfig()  # the router's defaults: the SLOs requests are judged against
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
    tpot_s: float | None = None  # after the first token; None: one token or unfinished
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
            priority = rng.choices(PRIORITIES, args.mix)[0]
            prompt = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(64, 192))]
            requests.append(Request(t, priority, prompt))
        start += args.step_s
    return requests


async def send(client: openai.AsyncOpenAI, model: str, request: Request, t0: float,
               max_tokens: int, send_priority: bool = True) -> Outcome:
    await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.monotonic()))
    outcome, sent = Outcome(request), time.monotonic()
    last_s, tokens = sent, 0
    try:
        stream = await client.completions.create(
            model=model, prompt=request.prompt, max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            extra_headers={"x-priority": request.priority} if send_priority else None)
        async for chunk in stream:
            if outcome.ttft_s is None and chunk.choices and chunk.choices[0].text:
                outcome.ttft_s = time.monotonic() - sent
            if chunk.choices and chunk.choices[0].finish_reason:
                outcome.done, last_s = True, time.monotonic()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if outcome.done and outcome.ttft_s is not None and tokens > 1:
            outcome.tpot_s = (last_s - sent - outcome.ttft_s) / (tokens - 1)
    except openai.RateLimitError:
        outcome.refused = True
    except (TimeoutError, openai.APIError):
        pass
    return outcome


def client(base_url: str, args: argparse.Namespace) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                              timeout=args.timeout_s)


async def drive(base_url: str, requests: list[Request], args: argparse.Namespace,
                send_priority: bool) -> list[Outcome]:
    model = default_model_path().stem
    async with client(base_url, args) as c:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(
            send(c, model, r, t0, args.max_tokens, send_priority) for r in requests)))


async def measure_capacity(base_url: str, args: argparse.Namespace) -> float:
    """Completed requests a second with `--capacity-concurrency` always in flight,
    counted over `--capacity-s` after a warm-up of the same length / 4."""
    rng = random.Random(args.seed + 1)
    model = default_model_path().stem
    loop = asyncio.get_running_loop()
    warm_until = loop.time() + args.capacity_s / 4
    end = warm_until + args.capacity_s
    done_at: list[float] = []

    async def worker(c: openai.AsyncOpenAI) -> None:
        while loop.time() < end:
            prompt = [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(rng.randint(64, 192))]
            outcome = await send(c, model, Request(0.0, "normal", prompt), 0.0,
                                 args.max_tokens)
            if outcome.done:
                done_at.append(loop.time())

    async with client(base_url, args) as c:
        await asyncio.gather(*(worker(c) for _ in range(args.capacity_concurrency)))
    return sum(warm_until <= t <= end for t in done_at) / args.capacity_s


@dataclass(frozen=True)
class Mode:
    admission: bool  # the router's qos.admission
    send_priority: bool  # the x-priority header (else every request is normal)
    paced: bool  # the engines' TPOT pacing (engine.tpot_slo_s)


MODES = {"admission": Mode(True, True, True),
         "admission_unpaced": Mode(True, True, False),
         "admission_off": Mode(False, True, True),
         "no_qos": Mode(False, False, False)}
BASELINES = tuple(MODES)[1:]


def cluster_config(state_dir: str, mode: Mode) -> ClusterConfig:
    engine = EngineConfig(kv_cache_memory_mb=1024, max_num_seqs=32,
                          tpot_slo_s=TPOT_SLO_S if mode.paced else PerClass())
    worker = WorkerConfig(engine=engine,
                          routing=RoutingConfig(enable_remote_prefill=False),
                          log_level="WARNING")
    return ClusterConfig(
        state_dir=state_dir, **cluster_ports(2), num_decode_workers=2, num_prefill_workers=0,
        worker=worker, pin_cores=True, secure=False, router_settings=RouterConfig(
            qos=QosConfig(admission=mode.admission), log_level="WARNING"))


def run(mode: Mode, capacity: float | None,
        args: argparse.Namespace) -> tuple[float, list[Outcome]]:
    with tempfile.TemporaryDirectory() as state:
        local = LocalCluster(cluster_config(state, mode))
        try:
            local.start()
            assert local.router is not None
            url = local.router.base_url
            if capacity is None:
                capacity = asyncio.run(measure_capacity(url, args))
            return capacity, asyncio.run(drive(url, workload(capacity, args), args,
                                               mode.send_priority))
        finally:
            local.stop()


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 3)


def verdict(o: Outcome, tpot: bool = True) -> SloOutcome | None:
    """The router's verdict (router/slo.py) on a completed request, under its default
    SLOs, with its TPOT judged or (`tpot` false) not; None: it did not complete."""
    if not o.done or o.ttft_s is None:
        return None
    return judge(QOS, o.request.priority, o.ttft_s, o.tpot_s if tpot else None)


def good(o: Outcome, tpot: bool = True) -> bool:
    """Completed within its class's TTFT SLO and (with `tpot`) its TPOT SLO."""
    return verdict(o, tpot) is SloOutcome.MET


def step_of(o: Outcome, args: argparse.Namespace) -> int:
    """The load step the request arrived in."""
    return min(int(o.request.arrival_s // args.step_s), len(args.steps) - 1)


def per_step(outcomes: list[Outcome], args: argparse.Namespace, tpot: bool = True
             ) -> list[float]:
    """Goodput of the requests that arrived in each load step (good / step_s)."""
    good_by_step = [0] * len(args.steps)
    for o in outcomes:
        good_by_step[step_of(o, args)] += good(o, tpot)
    return [round(n / args.step_s, 3) for n in good_by_step]


def late_by_step(outcomes: list[Outcome], args: argparse.Namespace) -> list[int]:
    """Requests admitted (not refused) that missed their TTFT SLO or did not finish, by
    the step they arrived in (those that missed only their TPOT SLO: `tpot_missed`)."""
    late = [0] * len(args.steps)
    for o in outcomes:
        if not o.refused and not good(o, tpot=False):
            late[step_of(o, args)] += 1
    return late


def summary(outcomes: list[Outcome], window_s: float, args: argparse.Namespace
            ) -> dict[str, object]:
    report: dict[str, object] = {}
    for priority in PRIORITIES:
        mine = [o for o in outcomes if o.request.priority == priority]
        ttft = [o.ttft_s for o in mine if o.done and o.ttft_s is not None]
        tpot = [o.tpot_s for o in mine if o.tpot_s is not None]
        report[priority] = {"offered": len(mine), "good": sum(good(o) for o in mine),
                            "refused": sum(o.refused for o in mine),
                            # admitted, yet not good: what admission let through too late
                            "late_by_step": late_by_step(mine, args),
                            "tpot_missed": sum(verdict(o) is SloOutcome.TPOT_MISSED
                                               for o in mine),
                            "unfinished": sum(not o.done and not o.refused for o in mine),
                            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                            "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99)}
    report["goodput_rps"] = round(sum(good(o) for o in outcomes) / window_s, 4)
    # as judged before TPOT SLOs existed (2026-12-06), to compare with earlier results
    report["goodput_ttft_only_rps"] = round(
        sum(good(o, tpot=False) for o in outcomes) / window_s, 4)
    return report


JUDGED = {"": True, "_ttft_only": False}  # goodput key suffix → TPOT judged too


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 3) if baseline > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 1, 2, 3, 5])
    parser.add_argument("--step-s", type=float, default=20.0)
    parser.add_argument("--mix", type=float, nargs=3, default=[0.1, 0.5, 0.4],
                        metavar=("HIGH", "NORMAL", "LOW"), help="shares of the classes")
    parser.add_argument("--capacity-concurrency", type=int, default=48)
    parser.add_argument("--capacity-s", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout-s", type=float, default=180.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=float, default=None, metavar="RPS",
                        help="use this capacity instead of measuring it (to compare "
                             "commits on the same offered load)")
    parser.add_argument("--admission-only", action="store_true",
                        help="only the admission run (no baselines, no ratios): for "
                             "pooling many seeds of two commits, alternated")
    parser.add_argument("--baselines", nargs="+", choices=BASELINES, default=BASELINES)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    capacity, on = run(MODES["admission"], args.capacity, args)
    window_s = args.step_s * len(args.steps)
    outcomes = {"admission": on}
    baselines = () if args.admission_only else tuple(args.baselines)
    for name in baselines:
        outcomes[name] = run(MODES[name], capacity, args)[1]
    results = {name: summary(mine, window_s, args) for name, mine in outcomes.items()}
    # goodput judged on TTFT and TPOT (""), and on TTFT alone, as before 2026-12-06
    steps = {(name, suffix): per_step(mine, args, tpot)
             for name, mine in outcomes.items() for suffix, tpot in JUDGED.items()}
    for (name, suffix), goodputs in steps.items():
        results[name][f"goodput{suffix}_rps_by_step"] = goodputs
    if args.admission_only:
        report = {"capacity_rps": round(capacity, 4), "workload": vars(args) | {"json": None},
                  "admission": results["admission"]}
        print(json.dumps(report) if args.json else json.dumps(report, indent=2))
        return
    ratio = {f"goodput{suffix}_vs_{name}": _ratio(
        float(results["admission"][f"goodput{suffix}_rps"]),  # type: ignore[arg-type]
        float(results[name][f"goodput{suffix}_rps"]))  # type: ignore[arg-type]
        for name in baselines for suffix in JUDGED}
    peak = {f"peak_step_goodput{suffix}_vs_{name}": _ratio(
        steps[("admission", suffix)][-1], steps[(name, suffix)][-1])
        for name in baselines for suffix in JUDGED}  # None: the baseline had no good one
    high_p99 = results["admission"]["high"]["ttft_p99_s"]  # type: ignore[index]
    high_ok = high_p99 is not None and high_p99 <= QOS.ttft_slo_s.high
    report = {"capacity_rps": round(capacity, 4), "workload": vars(args) | {"json": None},
              **results, "ratio": ratio | peak,
              "goals": {"high_ttft_p99_within_slo": high_ok, "goodput_ratio_min": 3.0},
              "goals_met": {name: bool(high_ok and value is not None and value >= 3.0)
                            for name, value in ratio.items() if "unpaced" not in name}}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
