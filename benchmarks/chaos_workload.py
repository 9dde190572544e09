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
                  long_fraction: float = 0.2, sampled_fraction: float = 0.1,
                  duplicate_every: int = 0) -> list[Request]:
    """`num_requests` seeded requests with ids `<row>-<i>` (plus, with duplicate_every,
    a duplicate of every n-th one: max_tokens 16, EOS ignored, so the original is still
    streaming when the duplicate arrives)."""
    rng = random.Random(f"{row}:{seed}")
    requests = []
    for i in range(num_requests):
        params = Params(max_tokens=rng.choice((4, 8, 12, 16)))
        if rng.random() < sampled_fraction:
            params = replace(params, temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31))
        body = rng.randrange(len(bank.bodies)) if rng.random() < long_fraction else -1
        prompt = (bank.bodies[body] + bank.tail(rng, f"{row}-{i}") if body >= 0
                  else rng.choice(bank.shorts))
        duplicated = duplicate_every > 0 and i % duplicate_every == duplicate_every - 1
        if duplicated:
            params = replace(params, max_tokens=16, ignore_eos=True)
        requests.append(Request(f"{row}-{i}", prompt, params, body))
        if duplicated:
            requests.append(replace(requests[-1], duplicate=True))
    return requests


def compute_references(requests: list[Request], engine_config: EngineConfig
                       ) -> dict[tuple[tuple[int, ...], Params], list[int]]:
    """Each distinct (prompt, params)'s output from the single-process engine. One
    prompt per body first, so that the rest find the body in the prefix cache."""
    engine = Engine.from_config(replace(engine_config, kv_cache_memory_mb=1024))
    keys = list(dict.fromkeys(r.key for r in requests))
    body_of = {r.key: r.body for r in requests}
    first: dict[int, tuple[tuple[int, ...], Params]] = {}
    for key in keys:
        if body_of[key] >= 0:
            first.setdefault(body_of[key], key)
    refs: dict[tuple[tuple[int, ...], Params], list[int]] = {}
    for batch in (list(first.values()), [k for k in keys if k not in set(first.values())]):
        if batch:
            outputs = engine.generate([list(p) for p, _ in batch],
                                      [params.sampling() for _, params in batch])
            refs.update(zip(batch, outputs))
    return refs
