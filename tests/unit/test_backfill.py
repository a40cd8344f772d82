"""The backfill's rules without services: options and preflight messages, window alignment, and the
idempotence filters (which events and windows are written again), run on the DirectRunner."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.backfill import (
    PreflightError,
    first_chunk_rows,
    main,
    plan_from_options,
    progress_text,
    split_into_chunks,
)
from tests.unit.helpers import PODCAST, plain_event
from transforms.backfill_filters import (
    CHANGED,
    UNCHANGED,
    KeepNewEvents,
    SplitAggregatesByCurrentValue,
    aggregate_changed,
    check_window_aligned,
    current_aggregates_query,
    existing_ids_query,
    window_range,
    window_row_key,
)
from transforms.bigquery_reads import BigQueryReadSettings
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.model import WindowAggregate
from transforms.postgres_source import TimeRange
from transforms.rows import window_aggregate_row

MINUTE = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
LOCAL = ["--bigquery_project=p", "--bigquery_dataset=d"]
# On Dataflow the DSN must not hold a password (pipelines/options.py: postgres_from_options).
DATAFLOW = ["--runner=DataflowRunner", "--postgres_dsn=host=db.internal dbname=engagement user=engagement"]


def aggregate(**changes) -> WindowAggregate:
    values = {
        "window_start": MINUTE,
        "window_end": MINUTE + timedelta(minutes=1),
        "content_id": PODCAST.id,
        "content_missing": False,
        "title": PODCAST.title,
        "slug": PODCAST.slug,
        "content_type": "podcast",
        "event_count": 3,
        "play_count": 2,
        "pause_count": 1,
        "finish_count": 0,
        "click_count": 0,
        "engagement_seconds_sum": Decimal("12.500"),
        "distinct_users": 2,
        "pane_timing": "ON_TIME",
        "pane_index": 0,
        "emitted_at": datetime(2026, 11, 22, 12, 0, tzinfo=UTC),
    }
    return WindowAggregate(**{**values, **changes})


# --- options and preflight without services -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--start and --end are required"),
        (["--start=2026-11-22T10:00:00Z", "--end=2026-11-22T09:00:00Z"], "must be after --start"),
        (["--start=2026-11-22T10:00:00Z", "--end=2026-13-40"], "--end '2026-13-40' is not an ISO-8601"),
        (["--start=2026-11-22T10:00:30Z", "--end=2026-11-22T11:00:00Z"], "not on a 60-second window boundary"),
        (["--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z", "--read_splits=0"], "at least 1"),
        (["--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z", "--chunk_rows=-1"], "--chunk_rows must be"),
        (
            [
                "--start=2026-11-22T10:00:00Z",
                "--end=2026-11-22T11:00:00Z",
                "--bigquery_write_method=local_storage_write",
                "--bigquery_endpoint=127.0.0.1:1",
            ],
            "needs --bigquery_rest_endpoint",
        ),
    ],
)
def test_bad_options_are_refused_before_any_service_is_touched(argv, message):
    with pytest.raises(PreflightError, match=message):
        plan_from_options(PipelineOptions([*LOCAL, *argv]))


def test_the_http_api_is_off_unless_asked_for(monkeypatch):
    argv = [*LOCAL, "--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z", "--http_api_url=http://api/v1"]
    assert plan_from_options(PipelineOptions(argv)).sinks.http is None
    monkeypatch.setenv("HTTP_API_TOKEN", "t0ken")
    asked = plan_from_options(PipelineOptions([*argv, "--send_to_http_api"]))
    assert asked.sinks.http is not None
    assert asked.sinks.http.endpoint == "http://api/v1"


def test_batch_settings_have_no_early_firings_and_keep_the_range():
    argv = [*LOCAL, "--start=2026-11-22T11:00:00+01:00", "--end=2026-11-22T11:00:00Z", "--window_seconds=30"]
    plan = plan_from_options(PipelineOptions(argv))
    assert plan.core.streaming is False
    assert plan.core.windows.window_seconds == 30
    assert plan.time_range == TimeRange(MINUTE, MINUTE + timedelta(hours=1))


def test_a_preflight_failure_is_one_line_and_exit_status_2(capsys):
    status = main([*LOCAL, "--start=yesterday", "--end=2026-11-22T11:00:00Z"])
    assert status == 2
    err = capsys.readouterr().err
    assert err == "backfill: error: --start 'yesterday' is not an ISO-8601 date or time\n"


# --- windows ----------------------------------------------------------------------------------------------


def test_ranges_must_cover_whole_windows():
    check_window_aligned(TimeRange(MINUTE, MINUTE + timedelta(minutes=5)), 60)
    check_window_aligned(TimeRange(MINUTE, MINUTE + timedelta(seconds=30)), 10)
    with pytest.raises(ValueError, match=r"--end .* not on a 60-second window boundary \(e.g. 2026-11-22T10:05:00"):
        check_window_aligned(TimeRange(MINUTE, MINUTE + timedelta(minutes=5, seconds=1)), 60)


def test_window_range_starts_at_the_window_holding_start():
    offset = timezone(timedelta(hours=2))
    time_range = TimeRange(datetime(2026, 11, 22, 12, 0, 30, tzinfo=offset), MINUTE + timedelta(minutes=3))
    assert window_range(time_range, 60) == (MINUTE, MINUTE + timedelta(minutes=3))


# --- chunks -----------------------------------------------------------------------------------------------


def at(minutes: int) -> datetime:
    return MINUTE + timedelta(minutes=minutes)


def counts(*rows: int) -> list[tuple[int, int]]:
    """Rows per minute window from MINUTE on (0: a window without rows, left out as the query leaves it)."""
    return [(int(at(index).timestamp()), n) for index, n in enumerate(rows) if n]


def test_chunks_cover_the_range_in_whole_windows_of_at_most_max_rows():
    chunks = split_into_chunks(TimeRange(at(0), at(6)), 60, counts(40, 40, 30, 0, 50, 10), max_rows=100)
    assert chunks == [TimeRange(at(0), at(2)), TimeRange(at(2), at(6))]  # 80 rows (110 with the third), then 90


def test_a_window_larger_than_a_chunk_is_a_chunk_of_its_own_never_split():
    chunks = split_into_chunks(TimeRange(at(0), at(4)), 60, counts(10, 250, 10, 10), max_rows=100)
    assert chunks == [TimeRange(at(0), at(1)), TimeRange(at(1), at(2)), TimeRange(at(2), at(4))]


def test_a_range_within_max_rows_is_one_chunk_even_with_empty_windows_at_its_ends():
    time_range = TimeRange(at(0), at(10))
    assert split_into_chunks(time_range, 60, counts(0, 0, 5, 5), max_rows=10) == [time_range]
    assert split_into_chunks(time_range, 60, [], max_rows=10) == [time_range]


def test_a_smaller_first_chunk_staggers_parallel_jobs_and_the_rest_keep_max_rows():
    chunks = split_into_chunks(
        TimeRange(at(0), at(6)), 60, counts(40, 40, 30, 0, 50, 10), max_rows=100, first_max_rows=50
    )
    assert chunks == [TimeRange(at(0), at(1)), TimeRange(at(1), at(4)), TimeRange(at(4), at(6))]  # 40, 70, 60


@pytest.mark.parametrize(("parallel", "first"), [("1", None), ("2", 125_000), ("4", 62_500)])
def test_the_first_chunk_is_one_parallel_share_of_the_others(parallel, first):
    argv = [*LOCAL, "--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z", "--chunk_rows=250000"]
    assert first_chunk_rows(plan_from_options(PipelineOptions([*argv, f"--parallel_chunks={parallel}"]))) == first


def test_chunks_follow_the_window_size():
    start = MINUTE
    per_window = [(int(start.timestamp()) + 30 * i, 10) for i in range(4)]
    chunks = split_into_chunks(TimeRange(start, start + timedelta(minutes=2)), 30, per_window, max_rows=20)
    assert [chunk.start for chunk in chunks] == [start, start + timedelta(minutes=1)]


def test_ranges_are_chunked_by_default_only_on_runners_that_hold_the_job_in_local_memory():
    argv = [*LOCAL, "--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z"]

    def chunk_rows(*extra: str) -> int:
        return plan_from_options(PipelineOptions([*argv, *extra])).chunk_rows

    assert chunk_rows() == chunk_rows("--runner=PrismRunner") == chunk_rows("--runner=DirectRunner") == 250_000
    assert chunk_rows(*DATAFLOW) == 0
    assert chunk_rows(*DATAFLOW, "--chunk_rows=500") == 500
    assert chunk_rows("--runner=PrismRunner", "--chunk_rows=0") == 0


def test_chunks_run_in_parallel_by_default_on_one_process_per_core_locally():
    argv = [*LOCAL, "--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z"]

    def parallel_chunks(*extra: str) -> int:
        return plan_from_options(PipelineOptions([*argv, *extra])).parallel_chunks

    assert parallel_chunks("--runner=FnApiRunner") == parallel_chunks("--runner=PrismRunner") == os.cpu_count()
    assert parallel_chunks(*DATAFLOW) == 1
    assert parallel_chunks("--parallel_chunks=3") == 3
    with pytest.raises(PreflightError, match="--parallel_chunks must be at least 1"):
        parallel_chunks("--parallel_chunks=0")


def test_a_template_launch_is_one_job():
    argv = [*LOCAL, "--start=2026-11-22T10:00:00Z", "--end=2026-11-22T11:00:00Z", *DATAFLOW]
    template = "--template_location=gs://bucket/templates/job_object"
    assert plan_from_options(PipelineOptions([*argv, template])).chunk_rows == 0
    with pytest.raises(PreflightError, match="a template launch submits one job"):
        plan_from_options(PipelineOptions([*argv, template, "--chunk_rows=1000"]))


def test_chunk_progress_reports_rows_rate_and_time_left():
    assert progress_text(300, 1_000, 10.0) == "read 300 of 1000 rows (30.0%), 30 rows/s, about 23s left"
    assert progress_text(0, 1_000, 0.0) == "read 0 of 1000 rows (0.0%), 0 rows/s, time left unknown"


def test_with_chunks_still_writing_the_time_left_is_the_writes_not_the_enrichment():
    # Everything enriched after 60 s, 600 of 1,000 rows in finished chunks: 400 more at 10 rows/s.
    assert progress_text(1_000, 1_000, 60.0, verb="enriched", written=600) == (
        "enriched 1000 of 1000 rows (100.0%), 17 rows/s, 600 written, about 40s left"
    )
    # The longer of the two: 500 more to enrich at 10 rows/s (50 s), 600 more to write at 8 rows/s (75 s).
    assert progress_text(500, 1_000, 50.0, verb="enriched", written=400).endswith("400 written, about 75s left")
    assert progress_text(1_000, 1_000, 60.0, verb="enriched", written=0).endswith("0 written, time left unknown")
    assert progress_text(1_000, 1_000, 60.0, verb="enriched", written=1_000).endswith("about 0s left")


def test_queries_read_only_the_range_of_the_configured_tables():
    settings = BigQueryReadSettings("p", "d", "events_x", "aggregates_x")
    time_range = TimeRange(MINUTE, MINUTE + timedelta(minutes=2))
    ids = existing_ids_query(settings, time_range)
    assert "`p.d.events_x`" in ids.sql
    assert "event_ts >= @start AND event_ts < @end" in ids.sql
    assert ids.timestamps == (("start", MINUTE), ("end", MINUTE + timedelta(minutes=2)))
    current = current_aggregates_query(settings, time_range, 60)
    assert "`p.d.aggregates_x`" in current.sql
    assert "ORDER BY emitted_at DESC, pane_index DESC" in current.sql  # as window_aggregates_current ranks panes


# --- which windows are written again ------------------------------------------------------------------------


def stored(computed: WindowAggregate, **changes) -> dict:
    """``computed`` as BigQuery returns it: a later pane, NUMERIC with its own scale, UTC timestamps."""
    row = window_aggregate_row(computed) | {"pane_timing": "LATE", "pane_index": 4}
    row["emitted_at"] = row["emitted_at"] - timedelta(hours=1)
    return row | changes


def test_an_equal_window_is_not_written_again_whatever_its_pane():
    computed = window_aggregate_row(aggregate())
    assert not aggregate_changed(computed, stored(aggregate(), engagement_seconds_sum=Decimal("12.5")))
    offset = timezone(timedelta(hours=-5))
    assert not aggregate_changed(
        computed, stored(aggregate(), window_end=(MINUTE + timedelta(minutes=1)).astimezone(offset))
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"event_count": 4},
        {"engagement_seconds_sum": Decimal("12.501")},
        {"distinct_users": 1},
        {"title": "Renamed"},
        {"click_count": 1},
    ],
)
def test_a_window_whose_value_differs_is_written(changes):
    assert aggregate_changed(window_aggregate_row(aggregate()), stored(aggregate(), **changes))


def test_a_window_the_table_lacks_is_written():
    assert aggregate_changed(window_aggregate_row(aggregate()), None)


def test_the_key_is_the_views_partition():
    row = window_aggregate_row(aggregate(content_id=None, content_missing=True))
    assert window_row_key(row) == (MINUTE, None, True)
    assert window_row_key(window_aggregate_row(aggregate())) == (MINUTE, str(PODCAST.id), False)


def test_only_changed_windows_go_to_bigquery_and_the_rest_to_redis_only():
    same, corrected, new = (
        aggregate(),
        aggregate(content_id=None, content_missing=True),
        aggregate(window_start=MINUTE + timedelta(minutes=1), window_end=MINUTE + timedelta(minutes=2)),
    )
    table = [stored(same), stored(corrected, event_count=1)]
    with test_pipeline.TestPipeline() as pipeline:
        current = pipeline | "Current" >> beam.Create([(window_row_key(row), row) for row in table])
        split = pipeline | beam.Create([same, corrected, new]) | SplitAggregatesByCurrentValue(current)
        assert_that(split[CHANGED], equal_to([corrected, new]), label="changed")
        assert_that(split[UNCHANGED], equal_to([same]), label="unchanged")


# --- which events are written again -------------------------------------------------------------------------


@pytest.mark.parametrize("ids_fit_in_memory", [False, True], ids=["join by key", "side input"])
@pytest.mark.parametrize("existing_ids", [[2, 7], []], ids=["some written", "none written"])
def test_events_already_in_bigquery_are_skipped(ids_fit_in_memory: bool, existing_ids: list[int]):
    events = [enrich(decode_record(plain_event(event_id, 5).value).event, PODCAST) for event_id in (1, 2, 3)]
    with test_pipeline.TestPipeline() as pipeline:
        existing = pipeline | "Existing" >> beam.Create(existing_ids)
        new = pipeline | beam.Create(events) | KeepNewEvents(existing, ids_fit_in_memory=ids_fit_in_memory)
        expected = [event_id for event_id in (1, 2, 3) if event_id not in existing_ids]
        assert_that(new | beam.Map(lambda event: event.event.id), equal_to(expected))
