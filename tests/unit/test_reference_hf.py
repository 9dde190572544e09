"""splitserve vs Hugging Face transformers on the same GGUF weights (SmolLM2-135M, fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.sampling import SamplingParams
from splitserve.engine.scheduler import ScheduledSequence

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a village by the sea,",
    "List three prime numbers:",
    "Translate to French: I like apples.",
    "Water boils at a temperature of",
    "The quick brown fox",
    "Q: What is 12 times 12?\nA:",
]


def test_logits_match_hf_for_a_64_token_prompt(smollm, smollm_engine, hf_smollm) -> None:
    text = ("In 1969, the Apollo 11 mission landed the first humans on the Moon. Neil Armstrong "
            "and Buzz Aldrin walked on the surface while Michael Collins orbited above. The "
            "mission returned samples of lunar rock and soil, and it remains one of the most "
            "celebrated achievements of the twentieth century, watched live by hundreds of "
            "millions of people around the world.")
    ids = smollm.tokenizer.encode(text)[:64]
    assert len(ids) == 64
    engine = smollm_engine(max_num_batched_tokens=64)
    seq = engine.add_request("ref", ids, SamplingParams(max_tokens=1, temperature=0))
    plan = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in plan.scheduled] == [64]
    hidden, _ = engine.runner.forward([ScheduledSequence(seq, 64)])
    ours = engine.loaded.model.compute_logits(hidden)
    with torch.inference_mode():
        theirs = hf_smollm(torch.tensor([ids])).logits[0].float()
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= 1e-3, f"max abs logit difference {max_diff}"


def test_greedy_tokens_match_hf(smollm, smollm_engine, hf_smollm) -> None:
    tok = smollm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    # Both stop at EOS (HF's min_new_tokens would mask EOS and change the argmax).
    ours = smollm_engine().generate(prompts, SamplingParams(max_tokens=32, temperature=0))
    assert sum(len(o) for o in ours) >= 6 * 32  # mostly full-length, not trivially short
    for ids, got in zip(prompts, ours):
        with torch.inference_mode():
            out = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                     attention_mask=torch.ones(1, len(ids)))
        assert got == out[0, len(ids):].tolist(), tok.decode(ids)


def test_tokenizer_matches_hf(smollm) -> None:
    transformers = pytest.importorskip("transformers")
    from splitserve.model.loader import default_model_path

    path = default_model_path()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = PROMPTS + ["naïve café — 東京 🚀 x²", "  leading spaces\n\n\ttabs", "12345.678",
                       "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert smollm.tokenizer.encode(text) == hf_tok.encode(text), text
        ids = smollm.tokenizer.encode(text)
        assert smollm.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_matches_hf(smollm) -> None:
    transformers = pytest.importorskip("transformers")
    from splitserve.model.loader import default_model_path

    path = default_model_path()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert smollm.tokenizer.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def smollm_bf16():  # type: ignore[no-untyped-def]
    from splitserve.model.loader import load_model

    return load_model(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def hf_smollm_bf16():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from splitserve.model.loader import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.bfloat16).eval()


def test_greedy_tokens_match_hf_in_bf16(smollm_bf16, hf_smollm_bf16) -> None:
    """bf16 model and KV against transformers in bf16, one prompt at a time: the same
    bf16 roundings (RoPE in bf16, attention in bf16, unmasked SDPA for a lone
    sequence) give the same tokens. In a batch of sequences of different lengths the
    decode mask rounds differently and tokens may part after a near-tie."""
    from splitserve.config.schema import EngineConfig
    from splitserve.engine.llm_engine import Engine

    tok = smollm_bf16.tokenizer
    engine = Engine(smollm_bf16, EngineConfig(num_pages=256, dtype="bfloat16"))
    params = SamplingParams(max_tokens=32, temperature=0)
    for text in PROMPTS:
        ids = tok.encode(text)
        got = engine.generate([ids], params)[0]
        with torch.inference_mode():
            out = hf_smollm_bf16.generate(torch.tensor([ids]), max_new_tokens=32,
                                          do_sample=False, attention_mask=torch.ones(1, len(ids)))
        assert len(got) >= 16
        assert got == out[0, len(ids):].tolist(), text
