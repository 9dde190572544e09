"""Runs a peers workload file through vLLM's CPU engine (offline `LLM.generate`).

Started by `benchmarks/peers.py` with the python of `.peers/vllm-venv`, never in the
project's venv. Prints one JSON line: setup time (engine start incl. weight load,
torch.compile and KV allocation), warm-up time, and the timed run's output tokens/s.

The environment must set VLLM_CPU_OMP_THREADS_BIND (peers.py binds all cores; vLLM's
default keeps one core back on a 2-core box) and VLLM_CPU_KVCACHE_SPACE. The engine
spawns worker processes, hence the `__main__` guard.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def run(workload_path: Path) -> None:
    from peers_workload import print_result, read_workload

    # benchmarks/ leaves sys.path before vLLM is imported: its kernels.py would shadow
    # the `kernels` package transformers probes for, here and in the spawned workers
    # (they inherit sys.path and re-import this module, which therefore imports
    # nothing from benchmarks/ at the top).
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    work = read_workload(workload_path)
    t0 = time.perf_counter()
    llm = LLM(model=work.model, dtype=VLLM_DTYPES[work.dtype], max_num_seqs=work.max_num_seqs,
              max_model_len=work.max_seq_len, skip_tokenizer_init=True, seed=0,
              enable_prefix_caching=False)
    setup_s = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)

    t0 = time.perf_counter()  # warm-up like engine_throughput's: the first request, 2 tokens
    llm.generate([TokensPrompt(prompt_token_ids=work.prompt_token_ids[0])], params(2),
                 use_tqdm=False)
    warmup_s = time.perf_counter() - t0

    prompts = [TokensPrompt(prompt_token_ids=p) for p in work.prompt_token_ids]
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, [params(n) for n in work.max_tokens], use_tqdm=False)
    seconds = time.perf_counter() - t0
    num_out = [len(o.outputs[0].token_ids) for o in outputs]
    if num_out != work.max_tokens:
        raise RuntimeError(f"vLLM produced {sum(num_out)} tokens, expected "
                           f"{work.num_output_tokens}")
    print_result(engine="vllm", version=vllm.__version__, dtype=work.dtype,
                 setup_s=round(setup_s, 2), warmup_s=round(warmup_s, 2),
                 seconds=round(seconds, 3), output_tokens=sum(num_out),
                 output_tokens_per_s=round(sum(num_out) / seconds, 1),
                 first_output_ids=list(outputs[0].outputs[0].token_ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", type=Path, help="a file written by peers_workload")
    run(ap.parse_args().workload)


if __name__ == "__main__":
    main()
