"""The streaming benchmark: a step keeps up when its backlog stops growing, whatever the latency; memory over time."""

from __future__ import annotations

import numpy as np

from devstack.benchmark_streaming import (
    Sample,
    StepFigures,
    backlog_growth_rate,
    memory_trend,
    step_figures,
    target_verdicts,
)

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


def step(rate: float, p95: float, kept_up: bool = True, cores: float | None = None) -> StepFigures:
    return StepFigures(
        target_rate=rate, events=int(rate * 60), committed_rate=rate, visible_rate=rate, p50=p95 / 2, p95=p95,
        p99=p95, max_latency=p95, unseen=0, backlog_end=0, backlog_max=0, lag_end_seconds=0.0,
        backlog_growth_rate=0.0, kept_up=kept_up, pipeline_cores=cores,
    )  # fmt: skip


def test_the_issue_targets_are_judged_on_their_own_steps():
    verdicts = target_verdicts([step(100, 1.5, cores=0.25), step(1000, 1.9), step(3000, 4.5)])
    assert verdicts == [
        "p95 commit->Redis <= 2 s at 1,000/s: met (p95 1.90 s)",
        "3,000/s sustained with p95 <= 5 s: met",
        "job <= 0.3 of a core at 100/s: met (0.25 cores)",
    ]


def test_a_missed_target_names_the_figure_that_misses_it():
    verdicts = target_verdicts([step(100, 1.9, cores=0.99), step(1000, 8.1), step(3000, 30.0, kept_up=False)])
    assert verdicts == [
        "p95 commit->Redis <= 2 s at 1,000/s: not met (p95 8.10 s)",
        "3,000/s sustained with p95 <= 5 s: not met (highest kept up 1,000/s, p95 8.10 s)",
        "job <= 0.3 of a core at 100/s: not met (0.99 cores)",
    ]
    assert target_verdicts([step(1000, 1.0, kept_up=False)])[0] == (
        "p95 commit->Redis <= 2 s at 1,000/s: not met (p95 1.00 s, did not keep up)"
    )
    assert target_verdicts([step(500, 1.0)])[2] == "job <= 0.3 of a core at 100/s: not measured"


def test_the_memory_trend_shows_each_process_over_time_and_its_slope_per_hour():
    mib = 2**20
    samples = [
        Sample(
            at=1000.0 + t,
            rss=0,
            job_cpu_seconds=0.0,
            machine_busy_seconds=0.0,
            machine_total_seconds=0.0,
            rss_by_process={"python": int((400 + t / 60) * mib), "prism": 200 * mib},  # +60 MiB/h, flat
            redis_used_memory=(50 * mib if t % 10 == 0 else None),
        )
        for t in range(0, 1801)
    ]
    lines = memory_trend(samples, 1000.0, 2800.0, rows=3)
    assert lines[0].split() == ["memory", "(MiB)", "prism", "python", "redis"]
    assert lines[1].split() == ["0s", "200", "400", "50"]
    assert lines[3].split() == ["1,800s", "200", "430", "50"]
    assert lines[-1].split()[:4] == ["MiB/hour", "+0.0", "+60.0", "+0.0"]


def test_no_trend_from_fewer_than_two_samples():
    assert memory_trend([], 0.0, 10.0) == []
