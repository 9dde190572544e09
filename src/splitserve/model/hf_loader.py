"""Read a Hugging Face model directory: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from splitserve.errors import ModelLoadError
from splitserve.model.config import ModelConfig, from_hf_config
from splitserve.model.tokenizer import TokenizerSpec

_SUPPORTED = {"llama", "mistral", "qwen2"}


class HFModelDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        raw = _read_json(path / "config.json")
        if raw is None:
            raise ModelLoadError(f"{path}: no config.json")
        model_type = raw.get("model_type")
        if model_type not in _SUPPORTED:
            raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported "
                                 f"(supported: {sorted(_SUPPORTED)})")
        if raw.get("attention_bias") or model_type == "qwen2":
            # Qwen2 has Q/K/V biases, which this model does not implement yet.
            raise ModelLoadError(f"{path}: attention biases are not supported")
        self.config: ModelConfig = from_hf_config(raw)
        generation = _read_json(path / "generation_config.json") or {}
        eos = generation.get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
            self.config = _replace_eos(self.config, eos_ids)
        self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise ModelLoadError(f"{path}: no *.safetensors files")

    @property
    def num_tensors(self) -> int:
        count = 0
        for f in self.files:
            with safe_open(str(f), framework="pt") as handle:
                count += len(list(handle.keys()))
        return count

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    yield name, handle.get_tensor(name).float()

    def tokenizer_spec(self) -> TokenizerSpec:
        tok_file = self.path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{self.path}: no tokenizer.json")
        tok_cfg = _read_json(self.path / "tokenizer_config.json") or {}
        return TokenizerSpec(
            backend_json=tok_file.read_text(),
            bos_token_id=self.config.bos_token_id,
            eos_token_ids=self.config.eos_token_ids,
            chat_template=tok_cfg.get("chat_template"),
            add_bos=bool(tok_cfg.get("add_bos_token", False)),
        )

    def digest(self) -> str:
        """Names, sizes and the first/last MiB of each weight file: cheap and stable."""
        h = hashlib.sha256()
        for f in self.files:
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as handle:
                h.update(handle.read(1 << 20))
                handle.seek(max(0, size - (1 << 20)))
                h.update(handle.read(1 << 20))
        return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _replace_eos(config: ModelConfig, eos_ids: tuple[int, ...]) -> ModelConfig:
    from dataclasses import replace

    return replace(config, eos_token_ids=eos_ids)
