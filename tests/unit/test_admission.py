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
    QUANTILE,
    RATE_TAU_S,
    Calibration,
    Estimate,
    Line,
    TtftModel,
    degraded_max_tokens,
    refusal,
)


def alone(model: TtftModel, tokens: int, ttft_s: float, priority: str = "normal") -> None:
    """A request sent and answered with nothing else served in between."""
    model.first_token(model.sent(tokens, priority), ttft_s)


def test_the_model_learns_a_line_of_ttft_over_tokens_of_work() -> None:
    model = TtftModel()
    assert model.estimate(100) is None  # no sample: no estimate
    first = model.sent(100)
    assert (first.mark, first.estimated_s, model.pending_tokens) == (0, None, 100)
    second = model.sent(300)
    assert (second.mark, model.ahead("normal")) == (0, 400)  # nothing served yet
    model.first_token(first, ttft_s=1.0)  # one sample: through zero, 0.01 s per token
    assert model.line == Line(0.0, 0.01) and model.pending_tokens == 300
    estimate = model.estimate(200)
    assert estimate is not None
    assert estimate.own_s == pytest.approx(2.0)  # alone: 200 tokens
    assert estimate.total_s == pytest.approx(0.01 * 500)  # behind the 300 in flight
    model.gave_up(model.sent(50))
    model.first_token(second, ttft_s=8.0)  # 400 tokens served while it waited
    assert model.pending_tokens == 0 and model.served == 400
    # first tokens from a worker whose TTFT is 0.05 s + 1.5 ms a token: once the
    # samples spread over MIN_SPREAD_TOKENS the fit finds both, whatever came before
    worker = Line(0.05, 0.0015)
    for i in range(80):  # the old samples' weight decays to 0.8 ** 80
        tokens = (8, 900, 150, 2000)[i % 4]
        alone(model, tokens, worker.at(tokens))
    assert model.line is not None
    assert model.line.base_s == pytest.approx(0.05, rel=1e-3)
    assert model.line.s_per_token == pytest.approx(0.0015, rel=1e-3)


def test_short_prompts_alone_fit_no_slope() -> None:
    """Samples of one size cannot tell the per-token cost from the fixed one: the line
    goes through zero, which overrates a long prompt (here 12.5 ms a token)."""
    model = TtftModel()
    for _ in range(20):
        alone(model, 4, 0.05)
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
        alone(model, 4, 0.05)
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
    low = model.sent(1000, "low")
    normal = model.sent(200, "normal")
    high = model.sent(100, "high")
    assert model.ahead("low") == 1300 and model.ahead("normal") == 300  # not the low tokens
    assert model.ahead("high") == 100
    assert model.ahead("") == model.ahead("normal")  # no priority: normal
    later = 100 * RATE_TAU_S  # the arrival rates (below) have decayed by then
    for priority, ahead in (("high", 100), ("normal", 300), ("low", 1300)):
        estimate = model.estimate(100, priority, later)
        assert estimate is not None
        assert estimate.total_s == pytest.approx(0.01 * (ahead + 100))
        assert estimate.wait_s == pytest.approx(0.01 * ahead)
    model.first_token(high, ttft_s=1.0)  # settles the high tokens
    model.gave_up(low)
    assert model.pending == [0, 200, 0] and model.pending_tokens == 200
    model.gave_up(normal)
    model.gave_up(normal)  # never below zero
    assert model.pending_tokens == 0


def test_work_that_overtook_a_request_counts_in_its_sample() -> None:
    """A worker at 10 ms a token, its queue ordered by class: a low request is sent, then
    four high ones that go first. Each first token is fitted on the tokens served while
    it waited, so the low request's 5 s wait is 500 tokens' work, not a slower worker.
    (Fitted on the tokens ahead at sending, as before, its sample read 50 ms a token.)"""
    model = TtftModel()
    low = model.sent(100, "low")
    highs = [model.sent(100, "high") for _ in range(4)]
    for i, ticket in enumerate(highs):
        model.first_token(ticket, ttft_s=1.0 * (i + 1))
    model.first_token(low, ttft_s=5.0)
    assert model.line is not None
    assert model.line.base_s == pytest.approx(0.0, abs=1e-9)
    assert model.line.s_per_token == pytest.approx(0.01)
    assert model.pending_tokens == 0 and model.served == 500


def test_calibration_settles_at_the_quantile_of_actual_over_estimated() -> None:
    calibration = Calibration()
    ratios = [1.0 + i / 100 for i in range(101)]  # 1.0 .. 2.0, evenly
    for n in range(4000):
        calibration.add(estimated_s=2.0, actual_s=2.0 * ratios[(n * 37) % 101])
    assert calibration.factor == pytest.approx(1.0 + QUANTILE, abs=0.06)
    settled = calibration.factor
    calibration.add(estimated_s=0.1, actual_s=10.0)  # mostly fixed cost: not a sample
    calibration.add(estimated_s=MAX_ESTIMATE_S, actual_s=1.0)  # no room: not a sample
    assert calibration.factor == settled


def test_a_class_whose_first_tokens_come_late_is_judged_on_calibrated_estimates() -> None:
    """Normal requests take 1.5× their estimate, an error the line does not absorb (it
    is held at 10 ms a token here: in a live router the error comes from the work that
    arrives while a request waits, which no line over tokens of work can see). Their
    estimates grow by 1.5 and a request estimated at 6 s is refused at 8 s; high
    requests keep theirs."""
    model = TtftModel()
    for _ in range(200):
        model.line = Line(0.0, 0.01)
        ticket = model.sent(100, "normal")  # estimated 1 s, takes 1.5 s
        assert ticket.estimated_s == pytest.approx(1.0)
        model.first_token(ticket, ttft_s=1.5)
    assert model.calibration[1].factor == pytest.approx(1.5, abs=0.05)
    assert model.calibration[0].factor == 1.0
    model.line = Line(0.0, 0.01)
    model.sent(500, "low")  # not ahead of either
    busy = model.sent(500, "high")
    later = 100 * RATE_TAU_S  # the arrival rates have decayed by then
    normal, high = model.estimate(100, "normal", later), model.estimate(100, "high", later)
    assert normal is not None and high is not None
    assert normal.total_s == pytest.approx(1.5 * 6.0, rel=0.04)
    assert high.total_s == pytest.approx(6.0)
    assert refusal(QosConfig(), "normal", normal) is not None  # 9 s against 8 s
    uncalibrated = model.estimate(100, "normal", later, calibrated=False)
    assert uncalibrated is not None and refusal(QosConfig(), "normal", uncalibrated) is None
    model.gave_up(busy)


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
        ticket = model.sent(100, "high", now=t + 0.25 * i)
        model.first_token(ticket, ttft_s=1.0)  # keeps 0.01 s a token
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
