"""Output tokens/s of the splitserve engine vs Hugging Face `generate` in static batches.

Workload: the first N requests of the Azure LLM conversation trace
(shared/traces/azure_llm_conversation_2023.csv), scaled for a 135M model on a CPU:
prompt length = clamp(ContextTokens / 8, 4, 512), output length =
clamp(GeneratedTokens / 4, 4, 128). Prompts are random non-special token ids of
those lengths (the trace has no text); EOS is ignored so every request produces
exactly its output length on both sides.

Baseline: transformers `generate` (greedy, KV cache) on the same weights and dtype,
in padded (left) static batches of `--batch-size` requests in trace order; a batch
runs until its longest request is done. splitserve runs all requests through
continuous batching with `max_num_seqs = --batch-size`. Both count only the
requested output tokens and use the same thread count. One JSON line with
`--json`: both throughputs and `ratio_vs_hf`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import time
from pathlib import Path

import torch

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / \
    "azure_llm_conversation_2023.csv"


def load_workload(path: Path, num_requests: int, vocab: int, seed: int) -> list[tuple[list[int],
                                                                                     int]]:
    rng = random.Random(seed)
    with path.open() as f:
        rows = [r for _, r in zip(range(num_requests), csv.DictReader(f))]
    work = []
    for r in rows:
        prompt_len = min(512, max(4, int(r["ContextTokens"]) // 8))
        output_len = min(128, max(4, int(r["GeneratedTokens"]) // 4))
        work.append(([rng.randrange(17, vocab) for _ in range(prompt_len)], output_len))
    return work


def run_splitserve(loaded, work, batch_size: int,  # type: ignore[no-untyped-def]
                   dtype: str = "float32") -> float:
    from splitserve.config.schema import EngineConfig
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams

    # kv_prefault "sync": the pool is faulted in before the clock starts, as vLLM and
    # transformers allocate theirs zeroed (the default does it in the background)
    engine = Engine(loaded, EngineConfig(max_num_seqs=batch_size, kv_cache_memory_mb=2048,
                                         enable_prefix_cache=False, dtype=dtype,
                                         kv_prefault="sync"))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in work]
    engine.generate([work[0][0]], params[0])  # warm-up
    t0 = time.perf_counter()
    outputs = engine.generate([p for p, _ in work], params)
    elapsed = time.perf_counter() - t0
    assert [len(o) for o in outputs] == [n for _, n in work]
    return elapsed


def run_hf(hf, work, batch_size: int, pad_id: int) -> float:  # type: ignore[no-untyped-def]
    import copy

    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.eos_token_id = None  # like ignore_eos: run every request to its length
    gen_cfg.pad_token_id = pad_id
    gen_cfg.do_sample = False
    hf.generate(torch.tensor([work[0][0]]), max_new_tokens=2, generation_config=gen_cfg)
    t0 = time.perf_counter()
    for start in range(0, len(work), batch_size):
        batch = work[start : start + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, generation_config=gen_cfg,
                        max_new_tokens=max(n for _, n in batch))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights, activations and KV (transformers runs in the same dtype)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from splitserve.model.loader import default_model_path, load_model

    dtype = getattr(torch, args.dtype)
    loaded = load_model(dtype=dtype)
    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    work = load_workload(args.trace, args.num_requests, loaded.config.vocab_size, args.seed)
    num_out = sum(n for _, n in work)

    ours_s = run_splitserve(loaded, work, args.batch_size, args.dtype)
    hf_s = run_hf(hf, work, args.batch_size, pad_id=loaded.config.eos_token_ids[0])
    result = {
        "benchmark": "engine_throughput",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__},
        "model": f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), {args.dtype}",
        "workload": {"trace": args.trace.name, "num_requests": len(work),
                     "scaling": "prompt=clamp(ctx/8,4,512), output=clamp(gen/4,4,128)",
                     "prompt_tokens": sum(len(p) for p, _ in work), "output_tokens": num_out,
                     "batch_size": args.batch_size},
        "splitserve": {"seconds": round(ours_s, 2), "output_tokens_per_s": round(num_out / ours_s,
                                                                                  1)},
        "hf_static_batches": {"seconds": round(hf_s, 2),
                              "output_tokens_per_s": round(num_out / hf_s, 1)},
        "ratio_vs_hf": round(hf_s / ours_s, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
