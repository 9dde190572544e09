"""A model of router_prefix.py's prefix-cache hit rates: what routing can reach at all.

router_prefix.py measures kv_aware against round_robin on a live cluster; this replays the
same workload (its `conversations()`: the seeded arrivals, think times and texts, each
prompt rendered with the model's chat template and tokenized as the server does) against
a model of each worker's prefix cache, to see which pool sizes and worker counts a
hit-rate ratio needs, in seconds instead of minutes a point.

The model of a worker: `--kv-cache-mb` of pages (45 KiB a token, SmolLM2 fp32; 16 tokens a
page), full pages cached under their chained prefix, one LRU queue of pages that ends a
request with its pages freed tail first (engine/page_allocator.py: a sequence's later
pages are evicted before its prefix). A request's hit is its longest cached prefix of
full pages on the worker it is sent to. Replies are `--reply-tokens` distinct tokens (the
live run's greedy replies are `--max-tokens` long), tokens of words that the next turn's
prompt tokenizes back to the same ids, as a model's plain-text replies mostly do. The simplifications, on purpose:
each request takes `--service-s` and holds no pages meanwhile; kv_aware keeps a
conversation on the worker its first turn went to (the live router does so through the
cached-prefix term of its cost, and spreads first turns by load: here alternately);
round_robin takes workers in turn in arrival order.

Live runs at 0a4f159 against this model (4 seeds), kv_aware / round_robin:
2 workers at 128 MiB 0.802 / 0.513 (model 0.805 / 0.551); 4 workers at 128 MiB
0.809 / 0.464 (model 0.826 / 0.475), at 64 MiB 0.755 / 0.355 (model 0.791 / 0.362).
`--json`: one object, a row a (workers, pool) point with both hit rates and their ratio.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
from collections import OrderedDict
from typing import Any

from router_prefix import add_workload_args, conversations, words

from splitserve.model.loader import load_tokenizer
from splitserve.model.tokenizer import Tokenizer

PAGE_TOKENS = 16
TOKEN_BYTES = 45 * 1024  # SmolLM2 fp32: 30 layers x 2 (K, V) x 3 KV heads x 64 x 4 bytes


class Worker:
    """A prefix cache of `num_pages` pages under one LRU queue (oldest first)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.lru: OrderedDict[tuple[int, ...], None] = OrderedDict()

    def serve(self, prompt: list[int], sequence: list[int]) -> int:
        """Cached prompt tokens; then `sequence`'s full pages are cached and freed tail
        first (the prefix ends up most recent)."""
        keys = [tuple(sequence[:end]) for end in
                range(PAGE_TOKENS, len(sequence) + 1, PAGE_TOKENS)]
        hit = 0
        for key in keys:
            if len(key) > len(prompt) or key not in self.lru:
                break
            hit += 1
        for key in reversed(keys):
            self.lru[key] = None
            self.lru.move_to_end(key)
        while len(self.lru) > self.num_pages:
            self.lru.popitem(last=False)
        return hit * PAGE_TOKENS


def replay(args: argparse.Namespace, tokenizer: Tokenizer, balance: str, workers: int,
           kv_cache_mb: int) -> float:
    """Cached prompt tokens / prompt tokens over the workload of `args`."""
    pages = kv_cache_mb * 1024 * 1024 // TOKEN_BYTES // PAGE_TOKENS
    pool = [Worker(pages) for _ in range(workers)]
    chats = conversations(args)
    reply_rng = random.Random(args.seed + 1)
    turn = itertools.count()
    home: dict[int, int] = {}
    events = [(chat.start_s, c, 0) for c, chat in enumerate(chats)]
    heapq.heapify(events)
    messages = {c: [{"role": "system", "content": chat.system}] for c, chat in enumerate(chats)}
    hit = total = 0
    while events:
        now, c, t = heapq.heappop(events)
        chat = chats[c]
        messages[c].append({"role": "user", "content": chat.turns[t]})
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[c]))
        if balance == "kv_aware":
            w = home.setdefault(c, len(home) % workers)
        else:
            w = next(turn) % workers
        reply = [i for i in tokenizer.encode(words(reply_rng, args.reply_tokens))
                 if i != tokenizer.bos_token_id][:args.reply_tokens]
        hit += pool[w].serve(prompt, prompt + reply)
        total += len(prompt)
        messages[c].append({"role": "assistant", "content": tokenizer.decode(reply)})
        if t + 1 < len(chat.turns):
            heapq.heappush(events, (now + args.service_s + chat.think_s[t + 1], c, t + 1))
    return hit / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(parser)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--service-s", type=float, default=1.0,
                        help="a turn's time on the server (the live run's: ~1 s)")
    parser.add_argument("--kv-cache-mb", type=int, nargs="+",
                        default=[32, 64, 96, 128, 192, 256, 1024])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    rows: list[dict[str, Any]] = []
    for workers, mb in itertools.product(args.workers, args.kv_cache_mb):
        rates = {}
        for balance in ("kv_aware", "round_robin"):
            seeded = [replay(argparse.Namespace(**vars(args), seed=s), tokenizer, balance,
                             workers, mb) for s in args.seeds]
            rates[balance] = round(sum(seeded) / len(seeded), 4)
        rows.append({"workers": workers, "kv_cache_mb": mb, **rates,
                     "ratio": round(rates["kv_aware"] / rates["round_robin"], 3)})
    report = {"workload": vars(args) | {"json": None}, "rows": rows,
              "best_ratio_by_workers": {w: max(r["ratio"] for r in rows if r["workers"] == w)
                                        for w in args.workers}}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
