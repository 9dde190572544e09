"""Engine behaviour on a tiny random-weight Llama: scheduling, caching, preemption, sampling."""

from __future__ import annotations

import random

import torch

from splitserve.engine.sampling import SamplingParams
from splitserve.model.llama import dense_causal_attention

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def reference_greedy(loaded, prompt: list[int], n: int) -> list[int]:
    """No pages, no batching: full recompute with dense causal attention each token."""
    cfg = loaded.config
    ids = list(prompt)
    for _ in range(n):
        x = torch.tensor(ids)
        hidden = loaded.model(x, torch.arange(len(ids)),
                              lambda layer, q, k, v: dense_causal_attention(
                                  q, k, v, cfg.head_dim**-0.5))
        ids.append(int(loaded.model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt):]


def test_paged_engine_matches_dense_recompute(tiny_engine, tiny_loaded) -> None:
    ps = prompts(6)
    got = tiny_engine().generate(ps, GREEDY)
    assert got == [reference_greedy(tiny_loaded, p, 12) for p in ps]


def test_batched_equals_alone(tiny_engine) -> None:
    ps = prompts(16)
    batched = tiny_engine().generate(ps, GREEDY)
    alone = [tiny_engine().generate([p], GREEDY)[0] for p in ps]
    assert batched == alone


def test_chunked_prefill_equals_unchunked(tiny_engine) -> None:
    ps = prompts(5, seed=7)
    whole = tiny_engine(max_num_batched_tokens=512).generate(ps, GREEDY)
    chunked = tiny_engine(max_num_batched_tokens=7).generate(ps, GREEDY)
    assert chunked == whole


def test_prefix_cache_hit_equals_cold_run(tiny_engine) -> None:
    engine = tiny_engine()
    shared = list(range(100, 140))  # 10 full pages of 4
    first = engine.generate([shared + [7, 8, 9]], GREEDY)[0]
    seq = engine.add_request("warm", shared + [7, 8, 9], GREEDY)
    while engine.has_unfinished:
        engine.step()
    assert seq.num_cached_tokens == 40
    assert seq.output_token_ids == first
    cold = tiny_engine(enable_prefix_cache=False).generate([shared + [7, 8, 9]], GREEDY)[0]
    assert cold == first


def test_full_prompt_cache_hit_still_computes_last_token(tiny_engine) -> None:
    engine = tiny_engine()
    prompt = list(range(16))  # exactly 4 pages
    first = engine.generate([prompt], GREEDY)[0]
    seq = engine.add_request("again", prompt, GREEDY)
    while engine.has_unfinished:
        engine.step()
    assert seq.num_cached_tokens == 12  # the last page is recomputed for its logits
    assert seq.output_token_ids == first


def test_preemption_when_pages_run_out_loses_nothing(tiny_engine) -> None:
    ps = prompts(8, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    roomy = tiny_engine().generate(ps, params)
    tight = tiny_engine(num_pages=24)  # 96 tokens for 8 sequences of up to 79
    got = tight.generate(ps, params)
    assert tight.scheduler.num_preemptions > 0
    assert got == roomy
    assert tight.allocator.num_used_pages == 0


def test_same_seed_same_tokens_and_different_seed_differs(tiny_engine) -> None:
    p = [[5, 6, 7, 8]]
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    a = tiny_engine().generate(p, sampled)
    b = tiny_engine().generate(p * 3, sampled)  # batched with copies of itself
    c = tiny_engine().generate(p, SamplingParams(max_tokens=24, temperature=1.0, seed=99))
    assert a[0] == b[0] == b[1] == b[2]
    assert a[0] != c[0]


def test_max_tokens_and_stop_token_ids(tiny_engine) -> None:
    engine = tiny_engine()
    [free] = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0))
    stop_at = free[3]
    first_stop = free.index(stop_at)
    seq = engine.add_request("s", [1, 2, 3], SamplingParams(max_tokens=10, temperature=0,
                                                            stop_token_ids=(stop_at,)))
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    assert seq.output_token_ids == free[: first_stop + 1]
    assert outs[-1].finished and outs[-1].finish_reason.value == "stop"


def test_abort_frees_pages_and_emits_abort(tiny_engine) -> None:
    engine = tiny_engine()
    engine.add_request("a", list(range(30)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    assert engine.allocator.num_used_pages > 0
    out = engine.abort("a")
    assert out is not None and out.finish_reason.value == "abort"
    assert engine.allocator.num_used_pages == 0 and not engine.has_unfinished
    assert engine.abort("a") is None


def test_continuous_batching_admits_between_steps(tiny_engine) -> None:
    engine = tiny_engine()
    engine.add_request("early", [1, 2, 3], SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):
        engine.step()
    late = engine.add_request("late", [4, 5, 6], SamplingParams(max_tokens=3, temperature=0))
    finished = []
    while engine.has_unfinished:
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["late", "early"]  # the late short request did not wait
    assert late.num_output_tokens == 3


def test_max_num_seqs_limits_running(tiny_engine) -> None:
    engine = tiny_engine(max_num_seqs=2)
    for i in range(5):
        engine.add_request(f"r{i}", [1, 2, i], SamplingParams(max_tokens=5, temperature=0))
    while engine.has_unfinished:
        engine.step()
        assert len(engine.scheduler.running) <= 2
