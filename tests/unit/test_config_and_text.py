"""Typed config parsing, sampler filters and incremental detokenization."""

from __future__ import annotations

import pytest
import torch

from splitserve.config.schema import EngineConfig, from_mapping
from splitserve.engine.sampler import sample
from splitserve.engine.sampling import SamplingParams
from splitserve.errors import ConfigError
from splitserve.model.tokenizer import IncrementalDetokenizer


def test_engine_config_from_mapping_checks_names_types_and_ranges() -> None:
    cfg = from_mapping(EngineConfig, {"page_size": 32, "dtype": "bfloat16", "num_pages": 10})
    assert (cfg.page_size, cfg.dtype, cfg.num_pages) == (32, "bfloat16", 10)
    with pytest.raises(ConfigError, match="page_sise: unknown setting"):
        from_mapping(EngineConfig, {"page_sise": 16})
    with pytest.raises(ConfigError, match="page_size: expected int, got '16'"):
        from_mapping(EngineConfig, {"page_size": "16"})
    with pytest.raises(ConfigError, match="dtype: must be one of"):
        from_mapping(EngineConfig, {"dtype": "fp8"})
    with pytest.raises(ConfigError, match="max_num_seqs: must be >= 1, got 0"):
        from_mapping(EngineConfig, {"max_num_seqs": 0})
    with pytest.raises(ConfigError, match="enable_prefix_cache: expected bool"):
        from_mapping(EngineConfig, {"enable_prefix_cache": 1})


def test_top_k_and_top_p_only_sample_allowed_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]])
    gen = torch.Generator().manual_seed(0)
    top2 = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(logits, [top2], [gen])[0] for _ in range(200)} == {1, 2}
    # probs ≈ [.005 .70 .26 .03 .00]: top_p 0.8 keeps tokens 1 and 2
    nucleus = SamplingParams(temperature=1.0, top_p=0.8)
    assert {sample(logits, [nucleus], [gen])[0] for _ in range(200)} == {1, 2}
    tiny_p = SamplingParams(temperature=1.0, top_p=0.01)
    assert {sample(logits, [tiny_p], [gen])[0] for _ in range(50)} == {1}
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy], [gen]) == [1]


def test_greedy_picks_the_first_of_tied_maxima_like_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(temperature=0.0)
    logits = torch.zeros(3, 49152)
    logits[0, [7, 9, 40000]] = 2.0
    logits[1] = -1.0
    logits[1, [3, 3000]] = -0.5
    logits[2, 49151] = 1.0
    want = logits.argmax(dim=-1).tolist()
    assert want == [7, 3, 49151]
    assert sample(logits, [greedy] * 3, [gen] * 3) == want


def test_incremental_detokenizer_never_splits_a_character(smollm) -> None:
    tok = smollm.tokenizer
    text = "naïve 東京 🚀 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_detokenizer_equals_a_full_decode(smollm) -> None:
    import random

    tok = smollm.tokenizer
    rng = random.Random(5)
    ids = tok.encode("Grüße aus 東京 🚀 — naïve café, ½ price! ") * 3
    ids += [rng.randrange(0, 49152) for _ in range(300)]  # arbitrary tokens, odd bytes
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in ids)
    full = tok.decode(ids)
    assert text == detok.text
    assert full.startswith(text) and len(full) - len(text) <= 2  # only a held-back tail


def test_sampling_frequencies_follow_the_probabilities() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    logits = torch.log(probs).unsqueeze(0)  # log 0 = -inf: never sampled
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(5)
    for _ in range(20_000):
        counts[sample(logits, [params], [gen])[0]] += 1
    assert counts[4] == 0
    assert torch.allclose(counts / counts.sum(), probs, atol=0.015)
