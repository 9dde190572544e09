"""The chaos suite's workload: seeded prompts, the single-process reference outputs.

Prompts are English-like sentences from a small word bank, tokenized by the served
model's tokenizer. Short prompts (10-30 tokens, always prefilled locally) come from a
shared pool. A long prompt (150-400 tokens) is a *body* from a small shared pool
followed by a *tail* of 48-64 tokens that is unique to the request: the decode
worker's prefix cache can serve at most the body, so every long prompt has at least
48 uncached tokens and goes remote (threshold 40), on a cold body with nothing cached
or on a warm one with a cached prefix. The reference engine prefills each body once
and serves the tails from its own prefix cache, so the references of a run cost about
one prefill per body plus one per tail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from splitserve.config.schema import EngineConfig
from splitserve.engine.llm_engine import Engine
from splitserve.engine.sampling import SamplingParams
from splitserve.model.tokenizer import Tokenizer

ADJECTIVES = ("quiet", "old", "bright", "narrow", "heavy", "silver", "distant", "careful",
              "broken", "warm", "green", "hidden", "patient", "sudden", "wooden", "frozen")
NOUNS = ("river", "stone", "lantern", "keeper", "market", "engine", "garden", "letter",
         "bridge", "painter", "harbor", "clock", "forest", "teacher", "window", "road")
VERBS = ("carries", "watches", "repairs", "follows", "paints", "remembers", "crosses",
         "opens", "counts", "finds", "guards", "measures")
PLACES = ("old mill", "north gate", "village square", "station", "library", "orchard",
          "lighthouse", "valley", "workshop", "ferry landing")
QUESTIONS = ("What does the {a} {n} do near the {p}?",
             "Describe the {a} {n} in one sentence.",
             "Why would a {n} visit the {p}?",
             "Write a short line about a {a} {n}.",
             "Who {v} the {n} at the {p}?")

NUM_SHORT_PROMPTS = 48
LONG_EVERY = 5
LONG_TOKENS = (150, 400)
TAIL_TOKENS = (48, 64)  # every long prompt's uncached part: above the 40-token threshold


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, ignore_eos=self.ignore_eos)


@dataclass(frozen=True)
class Request:
    """One logical request. A `duplicate` shares its original's request id and is sent
    while the original is in flight (the duplicate_ids fault)."""

    request_id: str
    prompt: tuple[int, ...]
    params: Params
    body: int = -1  # index of the long prompt's body; -1 for a short prompt
    duplicate: bool = False

    @property
    def is_long(self) -> bool:
        return self.body >= 0

    @property
    def key(self) -> tuple[tuple[int, ...], Params]:
        return self.prompt, self.params


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
            f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near the {rng.choice(PLACES)}.")


def _text_tokens(tokenizer: Tokenizer, rng: random.Random, header: str,
                 num_tokens: int) -> tuple[int, ...]:
    text = header
    tokens = tokenizer.encode(text)
    while len(tokens) < num_tokens:
        text += " " + " ".join(_sentence(rng) for _ in range(4))
        tokens = tokenizer.encode(text)
    return tuple(tokens[:num_tokens])


class PromptBank:
    """The shared short prompts and long-prompt bodies of one run (seeded)."""

    def __init__(self, tokenizer: Tokenizer, seed: int, num_bodies: int) -> None:
        rng = random.Random(f"bank:{seed}")
        self.tokenizer = tokenizer
        self.shorts = []
        for i in range(NUM_SHORT_PROMPTS):
            q = rng.choice(QUESTIONS).format(a=rng.choice(ADJECTIVES), n=rng.choice(NOUNS),
                                             p=rng.choice(PLACES), v=rng.choice(VERBS))
            self.shorts.append(tuple(tokenizer.encode(f"Question {i}: {q}")))
        body_high = LONG_TOKENS[1] - TAIL_TOKENS[1]
        body_low = LONG_TOKENS[0] - TAIL_TOKENS[0]
        self.bodies = [_text_tokens(tokenizer, rng, f"Report {b} from the archive.",
                                    rng.randint(body_low, body_high))
                       for b in range(num_bodies)]

    def tail(self, rng: random.Random, label: str) -> tuple[int, ...]:
        return _text_tokens(self.tokenizer, rng, f" Note {label}:", rng.randint(*TAIL_TOKENS))


def make_requests(bank: PromptBank, row: str, num_requests: int, seed: int, *,
                  sampled_fraction: float = 0.1, duplicate_every: int = 0) -> list[Request]:
    """`num_requests` seeded requests with ids `<row>-<i>`, one in LONG_EVERY long (at
    evenly spaced positions, so every stretch of the workload has its share), plus,
    with duplicate_every, a duplicate of every n-th one (max_tokens 16, EOS ignored:
    the original is still streaming when its duplicate arrives)."""
    rng = random.Random(f"{row}:{seed}")
    long_at = rng.randrange(LONG_EVERY)
    requests = []
    for i in range(num_requests):
        params = Params(max_tokens=rng.choice((4, 8, 12, 16)))
        if rng.random() < sampled_fraction:
            params = replace(params, temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31))
        body = rng.randrange(len(bank.bodies)) if i % LONG_EVERY == long_at else -1
        prompt = (bank.bodies[body] + bank.tail(rng, f"{row}-{i}") if body >= 0
                  else rng.choice(bank.shorts))
        duplicated = duplicate_every > 0 and i % duplicate_every == duplicate_every - 1
        if duplicated:
            params = replace(params, max_tokens=16, ignore_eos=True)
        requests.append(Request(f"{row}-{i}", prompt, params, body))
        if duplicated:
            requests.append(replace(requests[-1], duplicate=True))
    return requests


def reference_engine(engine_config: EngineConfig) -> Engine:
    """The single-process engine, with a pool that holds every body at once and more
    sequences per step (scheduling only: the model and its numerics are the same)."""
    return Engine.from_config(replace(engine_config, kv_cache_memory_mb=1024,
                                      max_num_seqs=64))


def compute_references(engine: Engine, requests: list[Request]
                       ) -> dict[tuple[tuple[int, ...], Params], list[int]]:
    """Each distinct (prompt, params)'s output from the single-process engine.

    Generation is run once per prompt and sampling settings at the largest max_tokens
    asked for: a shorter max_tokens gets the first tokens of that output (the same
    tokens, greedy or seeded, as a run that stops earlier). One prompt per body goes
    first, so that the others find the body in the prefix cache."""
    longest: dict[tuple[tuple[int, ...], Params], int] = {}
    body_of: dict[tuple[tuple[int, ...], Params], int] = {}
    for r in requests:
        run = (r.prompt, replace(r.params, max_tokens=0))
        longest[run] = max(longest.get(run, 0), r.params.max_tokens)
        body_of[run] = r.body
    runs = list(longest)
    first: dict[int, tuple[tuple[int, ...], Params]] = {}
    for run in runs:
        if body_of[run] >= 0:
            first.setdefault(body_of[run], run)
    outputs: dict[tuple[tuple[int, ...], Params], list[int]] = {}
    for batch in (list(first.values()), [r for r in runs if r not in set(first.values())]):
        if batch:
            params = [replace(p, max_tokens=longest[(prompt, p)]).sampling()
                      for prompt, p in batch]
            outputs.update(zip(batch, engine.generate([list(p) for p, _ in batch], params)))
    return {r.key: outputs[(r.prompt, replace(r.params, max_tokens=0))][:r.params.max_tokens]
            for r in requests}
