"""The trace simulator's cost model: how long the cluster's work takes, from measurement.

- prefill: milliseconds to prefill `n` prompt tokens alone on one instance, through the
  measured points (piecewise linear; beyond the last point the last segment's slope),
  or, with no points, `prefill_base_ms + prefill_ms_per_token·n + prefill_ms_per_token_sq·n²`
  (attention grows with the square of the length);
- decode step: `decode_base_ms + decode_ms_per_seq·batch + decode_ms_per_context_token·
  batch·mean_context` (weights are read once per step; each sequence adds its MLP rows
  and its attention over its context);
- a local prefill chunk in a decode step adds the prefill curve's increment over the
  chunk (prefill(o + c) - prefill(o)), so chunks late in a long prompt cost more;
- remote: `remote_overhead_ms` once (job publish + KVReady notification),
  `queue_overhead_ms` per job (a prefill worker's fetch), the KV transfer
  (`kv_bytes_per_token / transfer_bytes_per_s` per token);
- start-up: a new instance serves `startup_*_s` after it is asked for; a role flip takes
  `role_flip_s` after the drain.
The engine's limits (`max_num_seqs`, token budget per step, chunk cap, KV capacity in
tokens) are those of the measured EngineConfig.

Loaded from YAML/JSON (`load_profile`) or from `splitserve calibrate --json`
(`from_calibration`, which has the prefill curves and the remote overhead but no decode
steps: those come from a base profile).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitserve.config.schema import check_range, from_mapping, load_yaml
from splitserve.errors import ConfigError

DEFAULT_PROFILE = Path(__file__).resolve().parents[3] / "configs" / "profile-smollm2-cpu.yaml"


@dataclass(frozen=True)
class Profile:
    name: str = "unnamed"
    prefill_tokens: tuple[float, ...] = ()
    prefill_ms_points: tuple[float, ...] = ()
    prefill_base_ms: float = 0.0
    prefill_ms_per_token: float = 1.0
    prefill_ms_per_token_sq: float = 0.0
    decode_base_ms: float = 20.0
    decode_ms_per_seq: float = 1.0
    decode_ms_per_context_token: float = 0.0
    kv_bytes_per_token: int = 46080  # SmolLM2-135M fp32: 30 layers x 2 x 3 heads x 64 x 4 B x 2
    transfer_bytes_per_s: float = 3e9  # NIXL/UCX between processes here: 3-6 GB/s
    remote_overhead_ms: float = 20.0
    queue_overhead_ms: float = 5.0
    startup_prefill_s: float = 10.0
    startup_decode_s: float = 10.0
    role_flip_s: float = 2.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 256
    max_prefill_chunk_tokens: int = 128
    kv_capacity_tokens: int = 11648
    # the engine's TPOT pacing (engine.tpot_slo_s of the default class; 0: none)
    tpot_slo_ms: float = 0.0

    def __post_init__(self) -> None:
        if len(self.prefill_tokens) != len(self.prefill_ms_points):
            raise ConfigError("prefill_ms_points", f"{len(self.prefill_ms_points)} values for "
                              f"{len(self.prefill_tokens)} prefill_tokens")
        if len(self.prefill_tokens) == 1:
            raise ConfigError("prefill_tokens", "two points or more (or none: the formula)")
        if any(b <= a for a, b in zip(self.prefill_tokens, self.prefill_tokens[1:])):
            raise ConfigError("prefill_tokens", "must be strictly increasing")
        if any(v < 0 for v in (*self.prefill_tokens, *self.prefill_ms_points)):
            raise ConfigError("prefill_ms_points", "must be >= 0")
        for name in ("prefill_base_ms", "prefill_ms_per_token", "prefill_ms_per_token_sq",
                     "decode_base_ms", "decode_ms_per_seq", "decode_ms_per_context_token",
                     "remote_overhead_ms", "queue_overhead_ms", "startup_prefill_s",
                     "startup_decode_s", "role_flip_s", "tpot_slo_ms"):
            check_range(name, getattr(self, name), 0.0, 1e9)
        check_range("transfer_bytes_per_s", self.transfer_bytes_per_s, 0.0, 1e15, low_open=True)
        check_range("kv_bytes_per_token", self.kv_bytes_per_token, 0, 1 << 40)
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk_tokens",
                     "kv_capacity_tokens"):
            check_range(name, getattr(self, name), 1, 1 << 40)
        if self.decode_step_ms(1, 0.0) <= 0:
            raise ConfigError("decode_base_ms", "a decode step must take some time")

    # --- costs ---------------------------------------------------------------------
    def prefill_ms(self, num_tokens: float) -> float:
        """Milliseconds to prefill `num_tokens` prompt tokens alone (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        xs, ys = self.prefill_tokens, self.prefill_ms_points
        if not xs:
            return (self.prefill_base_ms + self.prefill_ms_per_token * num_tokens
                    + self.prefill_ms_per_token_sq * num_tokens * num_tokens)
        if num_tokens <= xs[0]:  # through the origin below the first point
            return ys[0] * num_tokens / xs[0] if xs[0] > 0 else ys[0]
        i = min(bisect.bisect_left(xs, num_tokens), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (num_tokens - x0) / (x1 - x0))

    def chunk_ms(self, offset: int, num_tokens: int) -> float:
        """A prefill chunk of `num_tokens` after `offset` tokens already computed."""
        return max(0.0, self.prefill_ms(offset + num_tokens) - self.prefill_ms(offset))

    def prefill_intercept_ms(self) -> float:
        """The fixed part of a prompt's first chunk: the prefill curve's intercept (the
        line through its first two points; `prefill_base_ms` for a line profile)."""
        xs, ys = self.prefill_tokens, self.prefill_ms_points
        if len(xs) < 2:
            return self.prefill_base_ms
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return min(ys[0], max(0.0, ys[0] - slope * xs[0]))

    def shared_step_ms(self, num_new_prompts: int, batch: int) -> float:
        """What a mixed step counts twice when its parts are priced alone: each of
        `num_new_prompts` first chunks and a decode batch carry a forward pass's fixed
        cost (`prefill_intercept_ms`, `decode_base_ms`), but one step runs one forward
        pass. Measured here: a step with a new 40-token prompt and decodes took ~170 ms
        live, ~240 ms when both fixed costs were charged (benchmarks/sim_validate.py)."""
        costs = [self.prefill_intercept_ms()] * num_new_prompts + (
            [self.decode_base_ms] if batch else [])
        return sum(costs) - max(costs) if costs else 0.0

    def decode_step_ms(self, batch: int, mean_context: float) -> float:
        return (self.decode_base_ms + self.decode_ms_per_seq * batch
                + self.decode_ms_per_context_token * batch * mean_context)

    def transfer_ms(self, num_tokens: int) -> float:
        return 1e3 * num_tokens * self.kv_bytes_per_token / self.transfer_bytes_per_s

    def startup_s(self, prefill: bool) -> float:
        return self.startup_prefill_s if prefill else self.startup_decode_s


def load_profile(path: str | Path | None = None) -> Profile:
    """A profile from YAML or JSON (JSON is YAML); the shipped one when `path` is None.
    A `splitserve calibrate --json` file (it has `break_even_tokens`) is read with
    `from_calibration` over the shipped profile."""
    path = Path(path) if path is not None else DEFAULT_PROFILE
    data = load_yaml(path)
    if "break_even_tokens" in data:
        return from_calibration(data, load_profile(None))
    return from_mapping(Profile, data)


def from_calibration(data: dict[str, Any], base: Profile) -> Profile:
    """`base` with what `splitserve calibrate --json` measured:
    - `local.medians` (tokens, ttft_ms of a local prefill on a decode worker, max_tokens 1)
      → the prefill curve (`prefill_tokens`, `prefill_ms_points`);
    - `remote.intercept_ms - local.intercept_ms` → `remote_overhead_ms` (publish, queue
      of an idle pool, KVReady: what a remote prefill costs besides the prefill itself);
    - `remote.slope_ms_per_token - local.slope_ms_per_token` → the transfer per token,
      written as `transfer_bytes_per_s` for the base's `kv_bytes_per_token` (unchanged
      when the remote slope is not steeper: the transfer is then below the noise).
    Decode steps, start-up times and the engine limits stay the base's."""
    try:
        medians = [(float(m["tokens"]), float(m["ttft_ms"])) for m in data["local"]["medians"]]
        local_line = (float(data["local"]["intercept_ms"]),
                      float(data["local"]["slope_ms_per_token"]))
        remote_line = (float(data["remote"]["intercept_ms"]),
                       float(data["remote"]["slope_ms_per_token"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("calibration", f"not a `splitserve calibrate --json` output: "
                          f"missing or bad {exc}") from None
    medians.sort()
    changes: dict[str, Any] = {
        "name": f"{base.name} + calibration",
        "prefill_tokens": tuple(x for x, _ in medians),
        "prefill_ms_points": tuple(max(0.0, y) for _, y in medians),
        "remote_overhead_ms": max(0.0, remote_line[0] - local_line[0]),
    }
    extra_ms_per_token = remote_line[1] - local_line[1]
    if extra_ms_per_token > 0 and base.kv_bytes_per_token > 0:
        changes["transfer_bytes_per_s"] = base.kv_bytes_per_token * 1e3 / extra_ms_per_token
    return dataclasses.replace(base, **changes)


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    out = dataclasses.asdict(profile)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def dump_json(profile: Profile) -> str:
    return json.dumps(profile_to_dict(profile), indent=2)
