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
    MIN_SPREAD_TOKENS,
    RATE_TAU_S,
    Estimate,
    Line,
    TtftModel,
    degraded_max_tokens,
    refusal,
)


def test_the_model_learns_a_line_of_ttft_over_tokens_of_work() -> None:
    model = TtftModel()
    assert model.estimate(100) is None  # no sample: no estimate
    ahead = model.sent(100)
    assert (ahead, model.pending_tokens) == (0, 100)
    assert model.sent(300) == 100
    model.first_token(100, 0, ttft_s=1.0)  # one sample: through zero, 0.01 s per token
    assert model.line == Line(0.0, 0.01) and model.pending_tokens == 300
    estimate = model.estimate(200)
    assert estimate is not None
    assert estimate.own_s == pytest.approx(2.0)  # alone: 200 tokens
    assert estimate.total_s == pytest.approx(0.01 * 500)  # behind the 300 in flight
    model.sent(50)
    model.gave_up(50)
    model.first_token(300, 100, ttft_s=8.0)
    assert model.pending_tokens == 0
    # first tokens from a worker whose TTFT is 0.05 s + 1.5 ms a token: once the
    # samples spread over MIN_SPREAD_TOKENS the fit finds both, whatever came before
    worker = Line(0.05, 0.0015)
    for i in range(80):  # the old samples' weight decays to 0.8 ** 80
        tokens = (8, 900, 150, 2000)[i % 4]
        model.first_token(tokens, 0, ttft_s=worker.at(tokens))
    assert model.line is not None
    assert model.line.base_s == pytest.approx(0.05, rel=1e-3)
    assert model.line.s_per_token == pytest.approx(0.0015, rel=1e-3)


def test_short_prompts_alone_fit_no_slope() -> None:
    """Samples of one size cannot tell the per-token cost from the fixed one: the line
    goes through zero, which overrates a long prompt (here 12.5 ms a token)."""
    model = TtftModel()
    for _ in range(20):
        model.first_token(4, 0, ttft_s=0.05)
    assert model.fit.var_tokens < MIN_SPREAD_TOKENS ** 2
    assert model.line == Line(0.0, 0.0125)


def test_a_long_prompt_is_refused_for_the_work_ahead_of_it_not_for_its_length() -> None:
    """What the router did: on an idle cluster whose first tokens came from short
    prompts, a 4,000-token prompt was estimated at 50 s and refused (429, retry later)
    at every retry. The thresholds now judge it with its tokens capped at the typical
    request's (the fit's mean: 4 here)."""
    config = QosConfig()  # normal: 8 s
    model = TtftModel()
    for _ in range(20):
        model.first_token(4, 0, ttft_s=0.05)
    idle = model.estimate(4000, "normal")
    assert idle is not None and (idle.own_s, idle.wait_s) == (pytest.approx(50.0), 0.0)
    assert idle.total_s > 8.0 and idle.judged_s == pytest.approx(0.05)
    assert refusal(config, "normal", idle) is None
    model.sent(200, "normal")  # 2.5 s of work ahead: admitted
    assert refusal(config, "normal", model.estimate(4000, "normal")) is None
    model.sent(500, "normal")  # 8.75 s ahead: refused, as a short prompt would be
    behind = model.estimate(4000, "normal")
    reason = refusal(config, "normal", behind)
    assert behind is not None and reason is not None
    assert "8.8 s of it waiting" in reason and behind.judged_s == pytest.approx(0.0125 * 704)
    short = model.estimate(4, "normal")  # up to the typical size: judged on all of it
    assert short is not None and short.judged_s == pytest.approx(short.total_s)
    assert refusal(config, "normal", short) is not None


def test_a_request_waits_only_for_its_class_and_higher_ones() -> None:
    """The workers' queues order high > normal > low: low work queued ahead does not
    make a normal request look late, and a high one waits for high ones only."""
    model = TtftModel(line=Line(0.0, 0.01))
    assert model.sent(1000, "low") == 0
    assert model.sent(200, "normal") == 0  # the low tokens are not ahead of it
    assert model.sent(100, "high") == 0
    assert model.ahead("low") == 1300 and model.ahead("normal") == 300
    assert model.ahead("") == model.ahead("normal")  # no priority: normal
    later = 100 * RATE_TAU_S  # the arrival rates (below) have decayed by then
    for priority, ahead in (("high", 100), ("normal", 300), ("low", 1300)):
        estimate = model.estimate(100, priority, later)
        assert estimate is not None
        assert estimate.total_s == pytest.approx(0.01 * (ahead + 100))
        assert estimate.wait_s == pytest.approx(0.01 * ahead)
    model.first_token(100, 0, ttft_s=1.0, priority="high")  # settles the high tokens
    model.gave_up(1000, "low")
    assert model.pending == [0, 200, 0] and model.pending_tokens == 200
    model.gave_up(500, "normal")  # never below zero
    assert model.pending_tokens == 0


def _total(model: TtftModel, tokens: int, priority: str, now: float) -> float:
    estimate = model.estimate(tokens, priority, now)
    assert estimate is not None
    return estimate.total_s


def test_higher_class_arrivals_stretch_the_wait_of_lower_ones() -> None:
    """While a request waits, higher classes keep arriving and go first: at `busy`
    share of the worker's time taken by them, the TTFT is estimate / (1 - busy)."""
    model = TtftModel(line=Line(0.0, 0.01))
    t = 100.0
    for i in range(50):  # 100 high tokens every 0.25 s: 400 tokens/s, busy ~4 × 0.01 ...
        model.sent(100, "high", now=t + 0.25 * i)
        model.first_token(100, 0, ttft_s=1.0, priority="high")  # keeps 0.01 s a token
    now = t + 0.25 * 49
    busy = model.busy("normal", now)
    assert busy >= MAX_BUSY  # ... more than the worker has
    assert _total(model, 50, "normal", now) == MAX_ESTIMATE_S
    assert refusal(QosConfig(), "normal", model.estimate(50, "normal", now)) is not None
    assert _total(model, 50, "high", now) == pytest.approx(0.5)  # nothing above high
    # the burst ends: its rate decays, the normal estimate comes back towards 0.5 s
    later = now + 10 * RATE_TAU_S
    assert model.busy("normal", later) < 0.01
    assert _total(model, 50, "normal", later) == pytest.approx(0.5, rel=0.02)
    # half the worker busy with high work: a normal request waits twice as long
    half = TtftModel(line=Line(0.0, 0.01), rates=[50.0, 0.0, 0.0], rate_at=later)
    assert half.busy("low", later) == pytest.approx(0.5)
    assert _total(half, 50, "normal", later) == pytest.approx(1.0)


def test_each_class_is_refused_above_its_own_limit() -> None:
    config = QosConfig()  # low 20 s, normal 8 s, high never: their SLOs
    assert refusal(config, "low", Estimate(0.1, 19.8, 19.9)) is None
    assert "priority low" in (refusal(config, "low", Estimate(0.1, 20.4, 20.5)) or "")
    assert refusal(config, "", Estimate(0.5, 6.5, 7.0)) is None
    assert refusal(config, "normal", Estimate(0.5, 8.5, 9.0))
    assert refusal(config, "high", Estimate(0.5, 1e6, 1e6)) is None
    assert refusal(config, "low", None) is None  # no estimate yet
    assert refusal(QosConfig(admission=False), "low", Estimate(0.5, 1e6, 1e6)) is None
    # the thresholds hold `judged_s`: a long prompt's own time is not the load
    assert refusal(config, "low", Estimate(30.0, 0.5, 0.8)) is None


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
    loaded = Estimate(0.2, 1.3, 1.5)
    assert degraded_max_tokens(config, "low", Estimate(0.2, 0.3, 0.5), 500) is None
    assert degraded_max_tokens(config, "low", loaded, 500) == 64
    assert degraded_max_tokens(config, "low", loaded, 10) is None  # already below the cap
    assert degraded_max_tokens(config, "low", loaded, None) is None  # the default is 64
    assert degraded_max_tokens(config, "normal", Estimate(0.2, 100.0, 100.2), 500) is None
    assert degraded_max_tokens(config, "low", None, 500) is None
    # a long prompt on an idle worker keeps its max_tokens
    assert degraded_max_tokens(config, "low", Estimate(30.0, 0.0, 0.2), 500) is None
