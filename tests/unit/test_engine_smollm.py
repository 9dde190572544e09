"""Engine invariants on the real SmolLM2 weights (near-ties in real logits are the test)."""

from __future__ import annotations

import random

import pytest

from splitserve.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def mixed_prompts(tokenizer, n: int) -> list[list[int]]:
    rng = random.Random(0)
    words = ["the", "of", "river", "mountain", "compute", "quickly", "seven", "blue", "history", "music", "proof", "language", "ocean", "garden", "engine", "theory", "apple", "window"]
    out = []
    for i in range(n):
        length = rng.choice([3, 9, 17, 40, 90, 150])
        text = f"Story {i}: " + " ".join(rng.choice(words) for _ in range(length))
        out.append(tokenizer.encode(text))
    return out


def test_batch_invariance_16_mixed_prompts(smollm, smollm_engine) -> None:
    prompts = mixed_prompts(smollm.tokenizer, 16)
    assert len({len(p) for p in prompts}) >= 5
    batched = smollm_engine().generate(prompts, GREEDY)
    engine = smollm_engine(enable_prefix_cache=False)
    alone = [engine.generate([p], GREEDY)[0] for p in prompts]
    assert batched == alone


def test_chunked_prefill_and_prefix_hit_match_cold(smollm, smollm_engine) -> None:
    tok = smollm.tokenizer
    system = tok.encode("You are a careful assistant. " * 12)  # ~80 tokens, 5 full pages
    prompts = [system + tok.encode(q) for q in ("Name a color.", "Count to five.")]
    cold = smollm_engine(enable_prefix_cache=False).generate(prompts, GREEDY)
    chunked = smollm_engine(enable_prefix_cache=False, max_num_batched_tokens=24).generate(
        prompts, GREEDY)
    assert chunked == cold
    engine = smollm_engine()
    engine.generate(prompts[:1], GREEDY)
    seq = engine.add_request("warm", prompts[1], GREEDY)
    while engine.has_unfinished:
        engine.step()
    assert seq.num_cached_tokens >= 64
    assert seq.output_token_ids == cold[1]


def test_stop_strings_are_cut_and_never_streamed(smollm, smollm_engine) -> None:
    tok = smollm.tokenizer
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    engine = smollm_engine()
    full = "".join(o.text_delta for o in engine.stream(
        "a", prompt, SamplingParams(max_tokens=16, temperature=0)))
    assert "Paris" in full
    cut = list(engine.stream("b", prompt, SamplingParams(max_tokens=16, temperature=0,
                                                         stop=("Paris",))))
    streamed = "".join(o.text_delta for o in cut)
    assert streamed == full[: full.index("Paris")]
    assert cut[-1].finish_reason.value == "stop"
