"""Runs a peers workload file through llama.cpp's batched C API (llama-cpp-python bindings).

Started by `benchmarks/peers.py` with the python of `.peers/llamacpp-venv`. The
bindings' server decodes one request at a time, so this drives `llama_decode`
directly, the way llama-server's slots do:

1. `max_num_seqs` slots, one llama.cpp sequence id each; requests enter free slots
   in trace order while their whole prompt fits in the step's token budget
   (`n_batch`, 2048 like llama-server).
2. Each step is one `llama_batch`: every running slot's last token plus the prompts
   admitted this step, logits only for the last token of each.
3. Greedy: argmax over each output row of the logits; a slot whose request reached
   its output length is cleared (`llama_memory_seq_rm`) and taken by the next request.

F32 and BF16 GGUFs are made once from the shipped Q4_1 GGUF with
`llama_model_quantize` (requantize: dequantize, then store in the target type), so
the weights are the ones splitserve and vLLM dequantize. KV cache in the same dtype
as the weights (F16 for Q4_1, llama.cpp's default). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

from peers_workload import Workload, print_result, read_workload

GGML_TYPE_BF16 = 30  # ggml.h; the Python bindings leave it out
N_BATCH = 2048


def convert(source: Path, target: Path, dtype: str, num_threads: int) -> float:
    """Writes `target` in `dtype` from the GGUF `source` unless it exists; seconds spent."""
    import llama_cpp as lc

    if target.exists():
        return 0.0
    t0 = time.perf_counter()
    params = lc.llama_model_quantize_default_params()
    params.ftype = {"fp32": lc.LLAMA_FTYPE_ALL_F32, "bf16": lc.LLAMA_FTYPE_MOSTLY_BF16}[dtype]
    params.allow_requantize = True
    params.nthread = num_threads
    partial = target.with_name(target.name + ".partial")
    if lc.llama_model_quantize(str(source).encode(), str(partial).encode(),
                               ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {source} -> {dtype} failed")
    partial.rename(target)
    return time.perf_counter() - t0


class Slots:
    """Continuous batching over a llama.cpp context with one sequence id per slot."""

    def __init__(self, ctx, work: Workload, n_vocab: int) -> None:  # type: ignore[no-untyped-def]
        import llama_cpp as lc
        import numpy as np

        self.lc, self.np, self.ctx, self.work, self.n_vocab = lc, np, ctx, work, n_vocab
        self.mem = lc.llama_get_memory(ctx)
        self.batch = lc.llama_batch_init(N_BATCH, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)

    def generate(self, request_ids: list[int], max_tokens: list[int]) -> list[list[int]]:
        """Greedy outputs of the given requests (output length per request overridden by
        `max_tokens`), at most `max_num_seqs` at a time."""
        lc, work = self.lc, self.work
        outputs: list[list[int]] = [[] for _ in request_ids]
        waiting = list(range(len(request_ids)))  # indices into request_ids, FCFS
        running: dict[int, tuple[int, int]] = {}  # slot -> (index, next position)
        free = list(range(work.max_num_seqs))
        while waiting or running:
            entries: list[tuple[int, int, int, bool]] = []  # token, position, slot, logits
            for slot, (i, pos) in running.items():
                entries.append((outputs[i][-1], pos, slot, True))
            admitted: list[int] = []
            while waiting and free:
                prompt = work.prompt_token_ids[request_ids[waiting[0]]]
                if len(entries) + len(prompt) > N_BATCH:
                    break
                i, slot = waiting.pop(0), free.pop(0)
                entries += [(t, p, slot, p == len(prompt) - 1) for p, t in enumerate(prompt)]
                running[slot] = (i, len(prompt))
                admitted.append(slot)
            out_slots = [slot for _, _, slot, logits in entries if logits]
            self._decode(entries)
            logits = self.np.ctypeslib.as_array(lc.llama_get_logits(self.ctx),
                                                shape=(len(out_slots), self.n_vocab))
            for slot, token in zip(out_slots, logits.argmax(axis=1).tolist()):
                i, pos = running[slot]
                outputs[i].append(token)
                running[slot] = (i, pos if slot in admitted else pos + 1)
                if len(outputs[i]) == max_tokens[i]:
                    del running[slot]
                    lc.llama_memory_seq_rm(self.mem, slot, -1, -1)
                    free.append(slot)
        return outputs

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for k, (token, pos, slot, logits) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
            b.seq_id[k][0] = slot
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(entries)} tokens")


def run(workload_path: Path, source: Path | None) -> None:
    import llama_cpp as lc

    work = read_workload(workload_path)
    model_path = Path(work.model)
    convert_s = convert(source, model_path, work.dtype, work.num_threads) if source else 0.0
    kv_type = {"fp32": lc.GGML_TYPE_F32, "bf16": GGML_TYPE_BF16}.get(work.dtype,
                                                                      lc.GGML_TYPE_F16)
    t0 = time.perf_counter()
    lc.llama_backend_init()
    model_params = lc.llama_model_default_params()
    # This CPU reports AMX: llama.cpp then repacks Q4_1 weights into its AMX buffer type,
    # and the first llama_decode segfaults (0.3.36, native build). F32/BF16 weights
    # never use that buffer type.
    model_params.use_extra_bufts = work.dtype != "q4_1"
    model = lc.llama_model_load_from_file(str(model_path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    params = lc.llama_context_default_params()
    params.n_seq_max = work.max_num_seqs
    # One KV cache shared by the slots (llama-server's default with several slots),
    # room for all of them at the longest request; per-slot streams prefilled a batch
    # of 16 prompts 1.6x slower here.
    params.n_ctx = work.max_num_seqs * (work.max_seq_len + 1)
    params.kv_unified = True
    params.n_batch, params.n_ubatch = N_BATCH, 512
    params.n_threads = params.n_threads_batch = work.num_threads
    params.type_k = params.type_v = kv_type
    ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context (KV type {kv_type})")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
    slots = Slots(ctx, work, n_vocab)
    setup_s = time.perf_counter() - t0

    t0 = time.perf_counter()  # warm-up like engine_throughput's: the first request, 2 tokens
    slots.generate([0], [2])
    lc.llama_memory_clear(slots.mem, True)
    warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    outputs = slots.generate(list(range(len(work.max_tokens))), work.max_tokens)
    seconds = time.perf_counter() - t0
    num_out = sum(len(o) for o in outputs)
    slots.close()
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    print_result(engine="llamacpp", version=lc.__version__, dtype=work.dtype,
                 gguf=model_path.name, kv_type={0: "f32", 1: "f16", 30: "bf16"}[kv_type],
                 convert_s=round(convert_s, 2), setup_s=round(setup_s, 2),
                 warmup_s=round(warmup_s, 2), seconds=round(seconds, 3),
                 output_tokens=num_out, output_tokens_per_s=round(num_out / seconds, 1),
                 first_output_ids=outputs[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", type=Path, help="a file written by peers_workload")
    ap.add_argument("--source", type=Path,
                    help="GGUF to convert the workload's model from when it is missing")
    args = ap.parse_args()
    run(args.workload, args.source)


if __name__ == "__main__":
    main()
