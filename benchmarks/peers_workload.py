"""The workload file that `benchmarks/peers.py` hands to each peer's runner, and the
runners' one-line JSON results.

Standard library only: the runners import it from their own virtualenvs (vLLM's,
llama.cpp's), which do not have the project installed. The file holds the exact
prompt token ids and output lengths of `engine_throughput.load_workload`, so every
engine decodes the same requests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = 1
DTYPES = ("fp32", "bf16", "q4_1")  # q4_1: llama.cpp only, the shipped GGUF as is


@dataclass(frozen=True)
class Workload:
    """Requests in trace order: `prompt_token_ids[i]` is generated for `max_tokens[i]`
    tokens, greedy, EOS ignored, at most `max_num_seqs` at a time on `num_threads`
    threads. `model` is what the runner loads: a Hugging Face directory (vLLM) or a
    GGUF file (llama.cpp); `dtype` is one of DTYPES."""

    prompt_token_ids: list[list[int]]
    max_tokens: list[int]
    max_num_seqs: int
    num_threads: int
    model: str
    dtype: str

    def __post_init__(self) -> None:
        if len(self.prompt_token_ids) != len(self.max_tokens):
            raise ValueError(f"{len(self.prompt_token_ids)} prompts but "
                             f"{len(self.max_tokens)} output lengths")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def max_seq_len(self) -> int:
        return max(len(p) + n for p, n in zip(self.prompt_token_ids, self.max_tokens))


def write_workload(path: Path, workload: Workload) -> None:
    path.write_text(json.dumps({"format": FORMAT, **asdict(workload)}))


def read_workload(path: Path) -> Workload:
    data = json.loads(path.read_text())
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a workload file of format {FORMAT}")
    return Workload(**data)


def print_result(**fields: object) -> None:
    """A runner's result: the last line it prints on stdout."""
    print(json.dumps(fields), flush=True)


def parse_result(stdout: str) -> dict[str, object]:
    """The runner's result line: the last stdout line that is a JSON object (engines
    may print their own lines before it)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict):
                return result
    raise ValueError("the runner printed no JSON result line")


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share (same weights and dtype agree
    for a long prefix; rounding differences between kernels end it eventually)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ratios(results: dict[str, dict[str, dict[str, object]]]) -> dict[str, dict[str, float]]:
    """splitserve's output tokens/s over each peer's, per dtype (> 1: splitserve is
    faster), from `results[dtype][engine]["output_tokens_per_s"]`; engines without a
    throughput (failed, skipped) get no ratio."""
    out: dict[str, dict[str, float]] = {}
    for dtype, engines in results.items():
        ours = engines.get("splitserve", {}).get("output_tokens_per_s")
        if not isinstance(ours, (int, float)):
            continue
        out[dtype] = {}
        for engine, result in engines.items():
            theirs = result.get("output_tokens_per_s")
            if engine != "splitserve" and isinstance(theirs, (int, float)) and theirs > 0:
                out[dtype][f"splitserve_over_{engine}"] = round(ours / theirs, 3)
    return out
