"""The seed offload policy (`routing.should_offload_prefill`), case by case, and the
rule the engine thread completes at admission (`OffloadRule`)."""

from __future__ import annotations

import pytest

from splitserve.errors import ConfigError
from splitserve.routing.offload import OffloadRule, RoutingConfig, should_offload_prefill

CONFIG = RoutingConfig(prefill_length_threshold=128, moderate_length_threshold=48,
                       prefill_queue_max=4, moderate_queue_max=1, decode_load_threshold=0.5)


@pytest.mark.parametrize(("effective_len", "queue_depth", "decode_load", "expected"), [
    (128, 0, 0.0, True),    # long: remote even when decode is idle
    (127, 0, 0.0, False),   # below the threshold, decode idle: local
    (128, 3, 0.0, True),    # the queue still has room
    (128, 4, 1.0, False),   # the queue is full: local whatever the length
    (48, 0, 0.5, True),     # moderate and decode busy, queue idle: remote
    (47, 0, 1.0, False),    # shorter than moderate: local
    (48, 0, 0.49, False),   # decode not busy: local
    (100, 1, 1.0, False),   # moderate, but a job is queued: it would wait behind it
    (0, 0, 1.0, False),     # everything cached
])
def test_seed_policy(effective_len: int, queue_depth: int, decode_load: float,
                     expected: bool) -> None:
    assert should_offload_prefill(CONFIG, effective_len, queue_depth, decode_load) is expected


def test_moderate_queue_max_is_capped_by_prefill_queue_max() -> None:
    config = RoutingConfig(prefill_length_threshold=128, moderate_length_threshold=48,
                           prefill_queue_max=2, moderate_queue_max=8,
                           decode_load_threshold=0.0)
    assert should_offload_prefill(config, 64, 1, 0.0)
    assert not should_offload_prefill(config, 64, 2, 0.0)


def test_disabled_keeps_everything_local() -> None:
    config = RoutingConfig(enable_remote_prefill=False)
    assert not should_offload_prefill(config, 100_000, 0, 1.0)


def test_low_priority_goes_remote_only_to_an_idle_pool() -> None:
    assert should_offload_prefill(CONFIG, 500, 0, 0.0, "low")
    assert not should_offload_prefill(CONFIG, 500, 1, 0.0, "low")  # busy: local
    assert should_offload_prefill(CONFIG, 500, 1, 0.0, "normal")
    assert should_offload_prefill(CONFIG, 500, 3, 0.0, "high")
    never = RoutingConfig(low_priority_queue_max=0)
    assert not should_offload_prefill(never, 500, 0, 0.0, "low")
    lenient = RoutingConfig(low_priority_queue_max=3)
    assert should_offload_prefill(lenient, 500, 2, 0.0, "low")


@pytest.mark.parametrize(("field", "value"), [
    ("prefill_length_threshold", -1), ("moderate_queue_max", -1),
    ("decode_load_threshold", 1.5), ("decode_load_threshold", -0.1),
    ("max_remote_attempts", 0), ("low_priority_queue_max", -1),
])
def test_invalid_thresholds_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"routing.{field}"):
        RoutingConfig(**{field: value})


def test_prompts_admitted_together_see_each_others_remote_prefills(tiny_engine) -> None:
    # Both rules are captured before either admission (queue idle); on the engine
    # thread the first goes remote, and the second, moderate, must then stay local
    # instead of queueing behind it on the prefill worker.
    from splitserve.engine.sampling import SamplingParams

    long_rule = OffloadRule(CONFIG, queue_depth=0, usable=True)
    short_rule = OffloadRule(CONFIG, queue_depth=0, usable=True)
    engine = tiny_engine()
    assert long_rule(200, 1.0, engine.stats().num_remote_pending)
    assert engine.reserve_remote("long", list(range(1, 201)), SamplingParams(max_tokens=4),
                                 attempt=1, release_at=1e12) is not None
    stats = engine.stats()
    assert stats.num_remote_pending == 1
    assert not short_rule(60, 1.0, stats.num_remote_pending)
    assert short_rule(60, 1.0, 0)  # as the captured depth alone would have said
    assert not OffloadRule(CONFIG, queue_depth=0, usable=False)(200, 1.0, 0)
