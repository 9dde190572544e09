"""Typed, validated configuration. All defaults live here; configs are frozen."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from splitserve.errors import ConfigError
from splitserve.priority import DEFAULT_PRIORITY, PRIORITIES


@dataclass(frozen=True)
class PerClass:
    """Seconds per priority class; 0: none (no limit)."""

    high: float = 0.0
    normal: float = 0.0
    low: float = 0.0

    def get(self, priority: str) -> float:
        return float(getattr(self, priority or DEFAULT_PRIORITY))

    def __post_init__(self) -> None:
        for name in PRIORITIES:
            value = getattr(self, name)
            if not 0 <= value <= 86400:
                raise ConfigError(name, f"must be in [0, 86400] s, got {value!r}")


TTFT_SLO_S = PerClass(high=2.0, normal=8.0, low=20.0)  # the classes' default SLOs
# time per output token after the first: the interactive classes are promised reading
# pace (the planner's scaling.tpot_slo_ms, 200 ms); low, the class degraded first, none
TPOT_SLO_S = PerClass(high=0.2, normal=0.2)


@dataclass(frozen=True)
class EngineConfig:
    """The inference engine of one worker.

    KV pool size: `num_pages` when set, else as many pages as fit in
    `kv_cache_memory_mb`. Defaults suit SmolLM2-135M on a CPU: fp32 KV is 45 KiB
    per token, so 512 MiB holds ~11.6k tokens.
    """

    model: str | None = None  # GGUF file or HF directory; None = embedded SmolLM2
    dtype: Literal["float32", "bfloat16"] = "float32"
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_mb: int = 512
    max_num_seqs: int = 64
    # Requests queued for a prefill (local, or landing pages reserved for a remote one)
    # beyond which new ones get RESOURCE_EXHAUSTED: no queue grows without bound.
    max_num_waiting: int = 1024
    # Tokens per step (decode tokens + prefill chunks). On 2 CPU cores a 256-token
    # step takes ~0.3 s with SmolLM2, which bounds how long a prefill chunk delays
    # the running sequences' next token.
    max_num_batched_tokens: int = 256
    # A prompt's chunk per step while others compete for the budget (budget left over
    # still goes to it): a short prompt behind a long one is prefilled in the next
    # step, not after the whole long prompt. A rest within 1.5x the cap is taken whole
    # when it fits (no tail left to cost its first token a step). None: no cap.
    max_prefill_chunk_tokens: int | None = 128
    # The time per output token each class is promised (as the router's qos.tpot_slo_s,
    # same defaults): while sequences of a class with one decode, a step's prompt chunks
    # are trimmed so that each one's mean time per token stays within it at the pace
    # this engine measured (engine/pace.py, engine/scheduler.py). 0 for every class:
    # every step may take max_num_batched_tokens.
    tpot_slo_s: PerClass = TPOT_SLO_S
    max_model_len: int | None = None  # None = the model's context length
    enable_prefix_cache: bool = True
    # Fault the KV pool's memory in at start (engine/kv_pool.py `prefault`): in a
    # background thread while the engine already serves (default), before the engine
    # is ready ("sync": what benchmarks against engines that zero their cache at start
    # use), or never ("off": the first writes to each page fault instead).
    kv_prefault: Literal["background", "sync", "off"] = "background"
    # auto: Triton kernels on CUDA, plain torch on CPU
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _positive(self, "page_size", "max_num_seqs", "max_num_batched_tokens",
                  "kv_cache_memory_mb", "max_num_waiting")
        if self.num_pages is not None and self.num_pages < 1:
            raise ConfigError("num_pages", f"must be >= 1, got {self.num_pages}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.max_prefill_chunk_tokens is not None and self.max_prefill_chunk_tokens < 1:
            raise ConfigError("max_prefill_chunk_tokens",
                              f"must be >= 1 or null, got {self.max_prefill_chunk_tokens}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError("cpu_threads", f"must be >= 1, got {self.cpu_threads}")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")


T = typing.TypeVar("T")


def from_mapping(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build a frozen config dataclass from a parsed YAML mapping, checking names and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or cls.__name__, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown setting (known: {sorted(fields)})")
    values = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as exc:  # the class's own checks name fields without the full path
        if not prefix or exc.field.startswith(prefix):
            raise
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise ConfigError(_join_path(prefix.rstrip("."), exc.field), message) from None


def _join_path(prefix: str, name: str) -> str:
    """`worker` + `drain_grace_s`; `worker.prefill` + `prefill.nak_delay_s` →
    `worker.prefill.nak_delay_s` (a nested class may already name its own section)."""
    head, tail = prefix.split("."), name.split(".")
    overlap = max((k for k in range(1, min(len(head), len(tail)) + 1)
                   if head[-k:] == tail[:k]), default=0)
    return ".".join(head + tail[overlap:])


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(path, "; ".join(errors))
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(path, f"must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, prefix=f"{path}.")  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(path, f"expected {hint.__name__}, got {value!r}")
        return value
    raise ConfigError(path, f"unsupported setting type {hint}")


def check_range(name: str, value: float, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming the dotted field unless `value` lies in the interval
    (NaN never does: every comparison with it is false)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(name, f"must be in {interval}, got {value!r}")


def check_address(name: str, address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(name, f"expected host:port (port 0-65535), got {address!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read config: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    return data


@dataclass(frozen=True)
class NatsConfig:
    """How this daemon uses the broker (the URL stays `nats_url`).

    - replicas: copies of the prefill stream and the KV buckets in a NATS cluster
      (1 for a single server, 3 for a 3-node cluster: one node may die).
    """

    replicas: int = 1

    def __post_init__(self) -> None:
        if self.replicas not in (1, 3, 5):
            raise ConfigError("nats.replicas", f"must be 1, 3 or 5, got {self.replicas}")
