"""router/admission.py: the TTFT model a router keeps per worker, the refusal rule per
priority class, and the `qos:` config."""

from __future__ import annotations

import pytest

from splitserve.config.router import PerClass, QosConfig, RouterConfig
from splitserve.config.schema import from_mapping
from splitserve.errors import ConfigError
from splitserve.router.admission import (
    MAX_BUSY,
    MAX_ESTIMATE_S,
    RATE_TAU_S,
    TtftModel,
    degraded_max_tokens,
    refusal,
)


def test_the_model_learns_seconds_per_token_of_work_ahead() -> None:
    model = TtftModel()
    assert model.estimate_s(100) is None  # no sample: no estimate
    ahead = model.sent(100)
    assert (ahead, model.pending_tokens) == (0, 100)
    assert model.sent(300) == 100
    model.first_token(100, 0, ttft_s=1.0)  # 0.01 s per token
    assert model.s_per_token == pytest.approx(0.01) and model.pending_tokens == 300
    assert model.estimate_s(200) == pytest.approx(0.01 * 500)
    model.first_token(300, 100, ttft_s=8.0)  # 8 s for 400 tokens: 0.02 s/token
    assert model.s_per_token == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)
    model.sent(50)
    model.gave_up(50)
    assert model.pending_tokens == 0


def test_a_request_waits_only_for_its_class_and_higher_ones() -> None:
    """The workers' queues order high > normal > low: low work queued ahead does not
    make a normal request look late, and a high one waits for high ones only."""
    model = TtftModel(s_per_token=0.01)
    assert model.sent(1000, "low") == 0
    assert model.sent(200, "normal") == 0  # the low tokens are not ahead of it
    assert model.sent(100, "high") == 0
    assert model.ahead("low") == 1300 and model.ahead("normal") == 300
    assert model.ahead("") == model.ahead("normal")  # no priority: normal
    later = 100 * RATE_TAU_S  # the arrival rates (below) have decayed by then
    assert model.estimate_s(100, "high", later) == pytest.approx(0.01 * 200)
    assert model.estimate_s(100, "normal", later) == pytest.approx(0.01 * 400)
    assert model.estimate_s(100, "low", later) == pytest.approx(0.01 * 1400)
    model.first_token(100, 0, ttft_s=1.0, priority="high")  # settles the high tokens
    model.gave_up(1000, "low")
    assert model.pending == [0, 200, 0] and model.pending_tokens == 200
    model.gave_up(500, "normal")  # never below zero
    assert model.pending_tokens == 0


def test_higher_class_arrivals_stretch_the_wait_of_lower_ones() -> None:
    """While a request waits, higher classes keep arriving and go first: at `busy`
    share of the worker's time taken by them, the wait is estimate / (1 - busy)."""
    model = TtftModel(s_per_token=0.01)
    t = 100.0
    for i in range(50):  # 100 high tokens every 0.25 s: 400 tokens/s, busy ~4 × 0.01 ...
        model.sent(100, "high", now=t + 0.25 * i)
        model.first_token(100, 0, ttft_s=1.0, priority="high")  # keeps s_per_token 0.01
    now = t + 0.25 * 49
    busy = model.busy("normal", now)
    assert busy >= MAX_BUSY  # ... more than the worker has
    assert model.estimate_s(50, "normal", now) == MAX_ESTIMATE_S
    assert model.estimate_s(50, "high", now) == pytest.approx(0.5)  # nothing above high
    # the burst ends: its rate decays, the normal estimate comes back towards 0.5 s
    later = now + 10 * RATE_TAU_S
    assert model.busy("normal", later) < 0.01
    assert model.estimate_s(50, "normal", later) == pytest.approx(0.5, rel=0.02)
    # half the worker busy with high work: a normal request waits twice as long
    half = TtftModel(s_per_token=0.01, rates=[50.0, 0.0, 0.0], rate_at=later)
    assert half.busy("low", later) == pytest.approx(0.5)
    assert half.estimate_s(50, "normal", later) == pytest.approx(1.0)


def test_each_class_is_refused_above_its_own_limit() -> None:
    config = QosConfig()  # low 2 s, normal 8 s, high never
    assert refusal(config, "low", 1.9) is None
    assert "priority low" in (refusal(config, "low", 2.5) or "")
    assert refusal(config, "", 7.0) is None and refusal(config, "normal", 9.0)
    assert refusal(config, "high", 1e6) is None
    assert refusal(config, "low", None) is None  # no estimate yet
    assert refusal(QosConfig(admission=False), "low", 1e6) is None


def test_the_qos_config_from_yaml() -> None:
    config = from_mapping(RouterConfig, {"qos": {"reject_above_s": {"low": 0.5},
                                                 "max_in_flight": 8}})
    assert config.qos.reject_above_s == PerClass(low=0.5)
    assert config.qos.max_in_flight == 8
    with pytest.raises(ConfigError) as err:
        from_mapping(RouterConfig, {"qos": {"reject_above_s": {"urgent": 1}}})
    assert err.value.field == "qos.reject_above_s.urgent"
    with pytest.raises(ConfigError):
        from_mapping(RouterConfig, {"qos": {"reject_above_s": {"low": -1}}})
    with pytest.raises(ConfigError):
        from_mapping(RouterConfig, {"qos": {"max_in_flight": 0}})


def test_degradation_caps_max_tokens_above_the_class_limit() -> None:
    config = QosConfig()  # low above 1 s: capped at 64
    assert degraded_max_tokens(config, "low", 0.5, 500) is None
    assert degraded_max_tokens(config, "low", 1.5, 500) == 64
    assert degraded_max_tokens(config, "low", 1.5, 10) is None  # already below the cap
    assert degraded_max_tokens(config, "low", 1.5, None) is None  # the default is 64
    assert degraded_max_tokens(config, "normal", 100.0, 500) is None
    assert degraded_max_tokens(config, "low", None, 500) is None
