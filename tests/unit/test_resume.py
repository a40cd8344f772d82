"""Restart planning (transforms/resume.py): pure rules and the two filters, on the DirectRunner."""

from __future__ import annotations

from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.streaming import plan_from_options
from tests.unit.helpers import PODCAST, at, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.kafka_source import KafkaReadOptions
from transforms.resume import KeepResumableWindows, SkipDelivered, align_down, intents_since, resume_point


def test_resume_point_goes_back_a_window_its_lateness_and_the_margin_then_aligns_down() -> None:
    last = datetime(2026, 11, 22, 10, 7, 42, 500_000, tzinfo=UTC)
    # 10:07:42.5 - (60 + 300 + 60) s = 10:00:42.5, aligned down to the minute.
    assert resume_point(last, 60, 300, 60) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert resume_point(last, 10, 30, 0) == datetime(2026, 11, 22, 10, 7, 0, tzinfo=UTC)


def test_recorded_batches_are_replayed_from_as_far_back_as_one_could_still_be_waiting() -> None:
    last = datetime(2026, 11, 22, 10, 7, 42, tzinfo=UTC)
    read_from = resume_point(last, 60, 300, 60)  # 10:00
    # Default budget (300 s): a batch recorded before 10:01:42 minus the margin gave up before the stop.
    assert intents_since(read_from, last, 300) == read_from
    # An hour's budget: a batch recorded at 09:06:42 could still have been waiting.
    assert intents_since(read_from, last, 3600) == datetime(2026, 11, 22, 9, 6, 42, tzinfo=UTC)


def test_align_down_keeps_a_window_start_and_rejects_a_negative_margin() -> None:
    start = datetime(2026, 11, 22, 10, 1, tzinfo=UTC)
    assert align_down(start, 60) == start
    with pytest.raises(ValueError, match="negative"):
        resume_point(start, 60, 300, -1)


def enriched(event_id: int, second: float):
    event = decode_record(plain_event(event_id, second).value).event
    return enrich(event, PODCAST)


def test_windows_before_the_resume_point_get_no_events() -> None:
    read_from = datetime.fromtimestamp(at(60), tz=UTC)
    events = [enriched(1, 59.999), enriched(2, 60), enriched(3, 61)]
    with test_pipeline.TestPipeline() as pipeline:
        kept = pipeline | beam.Create(events) | KeepResumableWindows(read_from) | beam.Map(lambda e: e.event.id)
        assert_that(kept, equal_to([2, 3]))


def load_held_ids() -> frozenset[int]:
    return frozenset({2, 4})


def test_events_a_sink_holds_are_skipped() -> None:
    events = [enriched(event_id, event_id) for event_id in range(1, 6)]
    with test_pipeline.TestPipeline() as pipeline:
        kept = (
            pipeline | beam.Create(events) | SkipDelivered("bigquery", load_held_ids) | beam.Map(lambda e: e.event.id)
        )
        assert_that(kept, equal_to([1, 3, 5]))


class LastRun:
    """What ``enriched_events`` says about the last run: the value BigQueryProgress would read."""

    def __init__(self, last: datetime | None) -> None:
        self._last = last

    def last_processed_at(self) -> datetime | None:
        return self._last


NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)


def streaming_options(start_offset: str, *extra: str) -> PipelineOptions:
    return PipelineOptions(
        [
            f"--start_offset={start_offset}",
            "--streaming",
            "--window_seconds=60",
            "--allowed_lateness_seconds=300",
            "--bigquery_project=local-project",
            "--bigquery_dataset=engagement",
            "--http_api_sink=disabled",
            *extra,
        ]
    )


def test_a_plan_passes_a_given_start_through_and_leaves_the_options_alone() -> None:
    options = streaming_options("2026-11-22T10:00:00+00:00")
    plan = plan_from_options(options, NOW, LastRun(None))
    assert plan.kafka.start_offset == "2026-11-22T10:00:00+00:00"
    assert plan.resume is None
    assert plan.core.windows_from is None
    assert plan.sinks.bigquery_holds is None
    assert plan.sinks.http_holds is None


def test_a_resume_reads_from_before_the_last_runs_windows_and_widens_lateness_for_the_re_read() -> None:
    options = streaming_options("resume", "--resume_margin_seconds=60")
    plan = plan_from_options(options, NOW, LastRun(datetime(2026, 11, 22, 10, 27, 30, tzinfo=UTC)))
    # 10:27:30 - (60 + 300 + 60) s = 10:20:30, aligned down to the minute.
    read_from = datetime(2026, 11, 22, 10, 20, tzinfo=UTC)
    assert plan.resume is not None
    assert plan.resume.read_from == read_from
    assert plan.kafka.start_offset == read_from.isoformat()
    assert plan.core.windows_from == read_from
    extra = 2 * 600  # twice the re-read's age at launch
    assert plan.core.windows.allowed_lateness_seconds == 300 + extra
    assert plan.core.dedup_horizon_seconds == 600 + extra
    # The core coalesces BigQuery's panes (--bigquery_pane_interval_seconds), in the state of the windows' totals,
    # so they too are kept for the widened lateness.
    assert plan.core.coalesce_panes_seconds == 10
    assert plan.sinks.bigquery_holds is not None
    # What was asked for is still what the options say: the plan carries the decision.
    assert options.view_as(KafkaReadOptions).start_offset == "resume"


@pytest.mark.parametrize(
    ("last", "why"),
    [(None, "a first run"), (datetime(2026, 11, 22, 10, 0, tzinfo=UTC), "a stop longer than the gap allowed")],
)
def test_without_a_usable_resume_the_job_starts_with_the_windows_still_open(last: datetime | None, why: str) -> None:
    plan = plan_from_options(streaming_options("resume", "--resume_max_gap_seconds=900"), NOW, LastRun(last))
    assert plan.resume is None, why
    assert plan.kafka.start_offset == datetime(2026, 11, 22, 10, 24, tzinfo=UTC).isoformat()  # now - (60 + 300) s
    assert plan.core.windows_from is None
