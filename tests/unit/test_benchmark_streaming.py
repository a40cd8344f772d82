"""The streaming benchmark's verdict: a step keeps up when its backlog stops growing, whatever the latency."""

from __future__ import annotations

import numpy as np

from devstack.benchmark_streaming import backlog_growth_rate, step_figures

RATE = 200.0
STEP_SECONDS = 60.0


def commits() -> np.ndarray:
    return np.arange(0.0, STEP_SECONDS, 1.0 / RATE)


def figures(committed: np.ndarray, visible: np.ndarray):
    return step_figures(RATE, committed, visible, committed, visible, max_backlog_growth=0.05)


def test_a_steady_job_keeps_up_even_with_a_backlog_of_several_seconds():
    committed = commits()
    result = figures(committed, committed + 6.0)  # 6 s late, always: 1,200 events in flight
    assert result.lag_end_seconds > 5
    assert abs(result.backlog_growth_rate) < 0.01 * RATE
    assert result.kept_up


def test_a_job_that_drains_slower_than_events_arrive_falls_behind():
    committed = commits()
    # Shows events at 90 % of the commit rate: the backlog grows by 10 % of the rate each second.
    visible = 1.0 + (committed - committed[0]) / 0.9
    result = figures(committed, visible)
    assert 0.08 * RATE < result.backlog_growth_rate < 0.12 * RATE
    assert not result.kept_up


def test_a_step_with_events_never_seen_did_not_keep_up():
    committed = commits()
    visible = committed + 1.0
    visible[::100] = np.nan
    assert not figures(committed, visible).kept_up


def test_growth_is_measured_between_quarter_means():
    # 16 samples, flat for 8, then +10 per second: the second quarter's mean is 0, the last's (50, 60, 70,
    # 80) is 65, and the quarters are 8 s apart.
    backlog = np.array([0] * 8 + [10 * n for n in range(1, 9)], dtype=float)
    assert backlog_growth_rate(backlog) == 65 / 8
    assert np.isnan(backlog_growth_rate(np.array([1.0, 2.0, 3.0])))
