"""Prefix-aware routing vs round-robin, through the router, on a multi-turn chat workload.

Workload (seeded): `--conversations` chats, each opened with one of `--system-prompts`
shared system prompts (~`--system-words` words), then `--turns` user turns of ~30
words; every turn re-sends the whole history (system, earlier turns and the replies
the server gave) to `POST /v1/chat/completions` (streaming, greedy, `--max-tokens`).
Conversations start at random (Poisson, `--arrival-rate` a second) and overlap; each
turn follows the previous one's reply after a random think time (exponential, mean
`--think-s`), as users do: no two conversations move in lockstep, so round-robin places
a conversation's turns on the workers at random, not by accident on the same one.

The default KV pool (`--kv-cache-mb` 128 a worker: ~2,900 tokens of SmolLM2 in fp32)
holds about a third of the histories the default workload builds (~8,700 tokens, in
the JSON as `working_set_tokens`): as in production, where a worker's cache keeps
minutes of traffic, not all of it. Round-robin then keeps each conversation on both
workers and evicts what the next turn needs; prefix-aware routing keeps each on one. With a pool that holds
everything (`--kv-cache-mb 1024`) both hit almost every prefix (round-robin misses
only the turns since a conversation last visited a worker) and the gap is small; so
does a long shared system prompt (`--system-words`), which both always hit.

Two runs, one after the other, each on a fresh local cluster (`LocalCluster`: nats,
`--workers` decode workers (2) pinned to the cores in turn, remote prefill off, so every
prefill is local and lands in the prefix cache, and a router): `balance: kv_aware` (load and cached
prefix, from the workers' KV events) and `balance: round_robin` (the baseline).
Reported per run: prefix-cache hit rate (cached prompt tokens / prompt tokens, from
`usage.prompt_tokens_details.cached_tokens`), TTFT p50/p99 (request sent → first
content chunk), throughput, the requests each worker finished (its /metrics: a pile on
one worker would leave half the cluster's cache unused) and each failed request's error
(admission refuses a normal request estimated past its 8 s SLO: a 429); `--json` prints one object with the ratios kv_aware /
round_robin and the issue's goals (hit rate ≥ 2×, TTFT p99 ≤ 0.5×).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from splitserve.config.daemon import ClusterConfig, WorkerConfig
from splitserve.config.router import RouterConfig
from splitserve.config.schema import EngineConfig
from splitserve.daemons.ports import cluster_ports
from splitserve.daemons.up import LocalCluster
from splitserve.model.loader import default_model_path
from splitserve.routing.offload import RoutingConfig

WORDS = ("river", "stone", "light", "garden", "paper", "signal", "winter", "orbit", "melody",
         "harbor", "lantern", "meadow", "canyon", "ember", "glacier", "compass", "violet",
         "thunder", "marble", "falcon")


@dataclass
class Sample:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)
    history_tokens: list[int] = field(default_factory=list)  # each chat's last prompt
    requests_by_worker: list[int] = field(default_factory=list)  # from each one's /metrics


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass
class Conversation:
    system: str
    turns: list[str]
    start_s: float  # after the run starts
    think_s: list[float]  # before each turn (the first: 0)


def conversations(args: argparse.Namespace) -> list[Conversation]:
    rng = random.Random(args.seed)
    systems = [f"You are assistant {i}. Context: {words(rng, args.system_words)}."
               for i in range(args.system_prompts)]
    chats, start_s = [], 0.0
    for c in range(args.conversations):
        turns = [f"Question {t} of chat {c}: {words(rng, 30)}?" for t in range(args.turns)]
        think_s = [0.0] + [rng.expovariate(1 / args.think_s) for _ in turns[1:]]
        chats.append(Conversation(systems[c % len(systems)], turns, start_s, think_s))
        start_s += rng.expovariate(args.arrival_rate)
    return chats


async def chat(client: openai.AsyncOpenAI, model: str, system: str, turns: list[str],
               start_s: float, think_s: list[float], max_tokens: int, run: Run) -> None:
    await asyncio.sleep(start_s)
    messages = [{"role": "system", "content": system}]
    history_tokens = 0
    for user, pause_s in zip(turns, think_s, strict=True):
        await asyncio.sleep(pause_s)
        messages.append({"role": "user", "content": user})
        sent = time.monotonic()
        first, text, usage = None, [], None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.monotonic()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
        except openai.APIError as e:
            run.errors += 1
            run.error_messages.append(f"{type(e).__name__}: {e}"[:300])
            return
        assert usage is not None
        details = usage.prompt_tokens_details
        run.samples.append(Sample((first or time.monotonic()) - sent, usage.prompt_tokens,
                                  details.cached_tokens if details else 0))
        messages.append({"role": "assistant", "content": "".join(text)})
        history_tokens = usage.prompt_tokens
    run.history_tokens.append(history_tokens)


def cluster_config(state_dir: str, balance: str, kv_cache_mb: int, workers: int) -> ClusterConfig:
    worker = WorkerConfig(
        engine=EngineConfig(kv_cache_memory_mb=kv_cache_mb, max_num_seqs=32),
        routing=RoutingConfig(enable_remote_prefill=False), log_level="WARNING")
    return ClusterConfig(
        state_dir=state_dir, **cluster_ports(workers, worker_metrics=True),
        num_decode_workers=workers, num_prefill_workers=0,
        worker=worker, pin_cores=True, secure=False,
        router_settings=RouterConfig(balance=balance, log_level="WARNING"))  # type: ignore[arg-type]


async def drive(base_url: str, args: argparse.Namespace) -> Run:
    run = Run()
    model = default_model_path().stem
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0,
                                  timeout=600) as client:
        start = time.monotonic()
        await asyncio.gather(*(chat(client, model, c.system, c.turns, c.start_s, c.think_s,
                                    args.max_tokens, run) for c in conversations(args)))
        run.wall_s = time.monotonic() - start
    return run


def measure(balance: str, args: argparse.Namespace) -> Run:
    with tempfile.TemporaryDirectory() as state:
        local = LocalCluster(cluster_config(state, balance, args.kv_cache_mb, args.workers))
        try:
            local.start()
            assert local.router is not None
            run = asyncio.run(drive(local.router.base_url, args))
            run.requests_by_worker = [finished_requests(w.config.metrics_address)
                                      for w in local.workers]
            return run
        finally:
            local.stop()


def finished_requests(metrics_address: str) -> int:
    """The requests a worker finished, from its /metrics (to see how the router spread
    the conversations: a pile on one worker uses half the cluster's cache)."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return round(sum(s.value for family in text_string_to_metric_families(text)
                     if family.name == "splitserve:request_success"
                     for s in family.samples if s.name.endswith("_total")))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(run: Run) -> dict[str, Any]:
    ttft = [s.ttft_s for s in run.samples]
    prompt = sum(s.prompt_tokens for s in run.samples)
    return {"requests": len(run.samples), "errors": run.errors,
            "error_messages": run.error_messages,
            "hit_rate": round(sum(s.cached_tokens for s in run.samples) / max(prompt, 1), 4),
            "ttft_p50_s": round(pct(ttft, 50), 4), "ttft_p99_s": round(pct(ttft, 99), 4),
            "requests_per_s": round(len(run.samples) / run.wall_s, 4),
            "working_set_tokens": sum(run.history_tokens),
            "requests_by_worker": run.requests_by_worker,
            "wall_s": round(run.wall_s, 2)}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The workload's options (`conversations()`), shared with router_prefix_model.py."""
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--arrival-rate", type=float, default=1.0,
                        help="conversations starting a second (Poisson)")
    parser.add_argument("--think-s", type=float, default=2.0,
                        help="mean pause before each later turn (exponential)")
    parser.add_argument("--system-prompts", type=int, default=2)
    parser.add_argument("--system-words", type=int, default=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-cache-mb", type=int, default=128,
                        help="each decode worker's KV pool (SmolLM2 fp32: 45 KiB a token)")
    parser.add_argument("--workers", type=int, default=2,
                        help="decode workers (the issue's goals are for 2; more share the "
                             "2 cores here, so their TTFTs are not comparable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balances", nargs="+", default=["kv_aware", "round_robin"],
                        choices=["kv_aware", "round_robin"], help="runs (both: the ratios)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {balance: summary(measure(balance, args)) for balance in args.balances}
    if len(results) < 2:
        print(json.dumps(results))
        return
    kv, rr = results["kv_aware"], results["round_robin"]
    ratio = {"hit_rate": round(kv["hit_rate"] / max(rr["hit_rate"], 1e-9), 3),
             "ttft_p50": round(kv["ttft_p50_s"] / rr["ttft_p50_s"], 3),
             "ttft_p99": round(kv["ttft_p99_s"] / rr["ttft_p99_s"], 3)}
    report = {"workload": vars(args) | {"json": None}, **results, "ratio": ratio,
              "goals": {"hit_rate_ratio_min": 2.0, "ttft_p99_ratio_max": 0.5},
              "goals_met": ratio["hit_rate"] >= 2.0 and ratio["ttft_p99"] <= 0.5}
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
