"""The router's verdict on each completed request: TTFT from its arrival, TPOT after the
first chunk's tokens, against its class's SLOs (router/slo.py)."""

from __future__ import annotations

import pytest

from splitserve.config.router import PerClass, QosConfig, RouterConfig
from splitserve.config.schema import from_mapping
from splitserve.errors import ConfigError
from splitserve.router.slo import Judged, SloClock, SloCounters, SloOutcome, judge

QOS = QosConfig(ttft_slo_s=PerClass(high=1.0, normal=4.0, low=0.0),
                tpot_slo_s=PerClass(high=0.1, normal=0.2, low=0.0))


@pytest.mark.parametrize(("priority", "ttft_s", "tpot_s", "outcome"), [
    ("high", 1.0, 0.1, SloOutcome.MET),  # at the limits is within them
    ("high", 1.01, 0.05, SloOutcome.TTFT_MISSED),
    ("high", 2.0, 0.5, SloOutcome.TTFT_MISSED),  # both missed: TTFT is judged first
    ("high", 0.5, 0.11, SloOutcome.TPOT_MISSED),
    ("high", 0.5, None, SloOutcome.MET),  # one chunk of tokens: no TPOT to judge
    ("normal", 3.0, 0.15, SloOutcome.MET),  # the same times, another class's limits
    ("normal", 3.0, 0.25, SloOutcome.TPOT_MISSED),
    ("", 3.0, 0.25, SloOutcome.TPOT_MISSED),  # no class named: the default one's
    ("low", 500.0, 9.0, SloOutcome.MET),  # 0: no promise
])
def test_a_request_is_judged_against_its_own_class(priority, ttft_s, tpot_s,
                                                   outcome) -> None:
    assert judge(QOS, priority, ttft_s, tpot_s) is outcome


def test_the_clock_times_the_first_tokens_and_those_after() -> None:
    clock = SloClock(arrived_s=10.0)
    assert clock.chunk(0, 10.5) is None  # a chunk without tokens (text held back) starts nothing
    assert clock.chunk(2, 11.0) == 1.0  # the first tokens, 1 s after arrival: the TTFT
    assert clock.chunk(1, 11.3) is None
    clock.chunk(0, 11.4)
    assert clock.chunk(3, 11.9) is None  # 4 tokens after the first chunk's, 0.9 s later
    judged = clock.judged(QOS, "high")
    assert judged == Judged(SloOutcome.TPOT_MISSED, 1.0, pytest.approx(0.225))
    assert clock.judged(QOS, "normal") == Judged(SloOutcome.TPOT_MISSED, 1.0,
                                                 pytest.approx(0.225))
    assert clock.judged(QOS, "low").outcome is SloOutcome.MET


def test_a_request_without_tokens_is_not_judged() -> None:
    clock = SloClock(arrived_s=0.0)
    clock.chunk(0, 1.0)
    assert clock.judged(QOS, "high") is None
    one = SloClock(arrived_s=0.0)
    one.chunk(1, 0.4)
    assert one.judged(QOS, "high") == Judged(SloOutcome.MET, 0.4, None)


def test_counters_list_every_class_and_outcome() -> None:
    counters = SloCounters()
    counters.add("high", SloOutcome.MET)
    counters.add("high", SloOutcome.MET)
    counters.add("", SloOutcome.TPOT_MISSED)  # counted as the default class
    counters.add("bogus", SloOutcome.TTFT_MISSED)
    rows = {(p, o): n for p, o, n in counters.rows()}
    assert len(rows) == 9 and sum(rows.values()) == 4
    assert rows[("high", SloOutcome.MET)] == 2
    assert rows[("normal", SloOutcome.TPOT_MISSED)] == 1
    assert rows[("normal", SloOutcome.TTFT_MISSED)] == 1
    assert rows[("low", SloOutcome.MET)] == 0


def test_tpot_slos_from_yaml() -> None:
    assert QosConfig().tpot_slo_s == PerClass(high=0.2, normal=0.2, low=0.0)
    config = from_mapping(RouterConfig, {"qos": {"tpot_slo_s": {"low": 0.5}}})
    assert config.qos.tpot_slo_s == PerClass(low=0.5)
    with pytest.raises(ConfigError) as err:
        from_mapping(RouterConfig, {"qos": {"tpot_slo_s": {"high": -0.1}}})
    assert err.value.field == "qos.tpot_slo_s.high"
