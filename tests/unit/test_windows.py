"""SPEC §5 windows on the DirectRunner with TestStream: early, on-time and late panes, lateness, duplicates."""

import dataclasses
from decimal import Decimal

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger

from pipelines.core import CoreSettings, build_core
from tests.unit.helpers import PODCAST, VIDEO, at, plain_event, snapshot
from transforms.aggregate import FLUSH_GRID_MS, WindowSettings, flush_due_ms, window_trigger

SETTINGS = CoreSettings(
    windows=WindowSettings(window_seconds=60, allowed_lateness_seconds=120, early_firing_seconds=1),
    dedup_horizon_seconds=600,
)


def streaming_pipeline() -> test_pipeline.TestPipeline:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    return test_pipeline.TestPipeline(options=options)


def run_panes(stream: test_stream.TestStream, settings: CoreSettings = SETTINGS) -> beam.PCollection:
    """Runs the core graph on ``stream`` and returns its panes as comparable tuples."""
    pipeline = streaming_pipeline()
    content = pipeline | "Content" >> beam.Create([snapshot(PODCAST, VIDEO)])
    outputs = build_core(pipeline | stream, content, settings)
    panes = outputs.aggregates | "AsTuples" >> beam.Map(
        lambda a: (
            int(a.window_start.timestamp() - at(0)),
            a.slug,
            a.pane_timing,
            a.event_count,
            a.engagement_seconds_sum,
            a.distinct_users,
        )
    )
    return pipeline, panes


def test_on_time_pane_holds_the_window_totals():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5), plain_event(2, 30, user=2), plain_event(3, 59, content=VIDEO)])
        .advance_watermark_to(at(60))
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "ON_TIME", 2, Decimal("2.000"), 2),
                (0, "launch-video", "ON_TIME", 1, Decimal("1.000"), 1),
            ]
        ),
    )
    pipeline.run()


def test_early_pane_fires_in_processing_time_then_on_time_pane_accumulates():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5)])
        .advance_processing_time(1.5)
        .add_elements([plain_event(2, 10, duration_ms=2500)])
        .advance_watermark_to(at(60))
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "EARLY", 1, Decimal("1.000"), 1),
                (0, "deep-dive-42", "ON_TIME", 2, Decimal("3.500"), 1),
            ]
        ),
    )
    pipeline.run()


def test_early_panes_at_zero_seconds_fire_for_each_batch_of_data_that_arrives():
    settings = CoreSettings(
        windows=WindowSettings(window_seconds=60, allowed_lateness_seconds=120, early_firing_seconds=0),
        dedup_horizon_seconds=600,
    )
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        # No processing time passes: a pane per batch, not per delay.
        .add_elements([plain_event(1, 5), plain_event(2, 10, duration_ms=2500)])
        .add_elements([plain_event(3, 20)])
        .advance_watermark_to(at(60))
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream, settings)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "EARLY", 2, Decimal("3.500"), 1),
                (0, "deep-dive-42", "EARLY", 3, Decimal("4.500"), 1),
                (0, "deep-dive-42", "ON_TIME", 3, Decimal("4.500"), 1),
            ]
        ),
    )
    pipeline.run()


def test_late_event_within_allowed_lateness_corrects_the_window():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5)])
        .advance_watermark_to(at(90))  # on-time pane for [0, 60)
        # 30 s behind the window end: late, but within allowed lateness.
        .add_elements([plain_event(2, 20, duration_ms=4000), plain_event(3, 21, duration_ms=1000)])
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "ON_TIME", 1, Decimal("1.000"), 1),
                (0, "deep-dive-42", "LATE", 3, Decimal("6.000"), 1),
            ]
        ),
    )
    pipeline.run()


def test_event_beyond_allowed_lateness_leaves_the_window_unchanged():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5)])
        .advance_watermark_to(at(60 + 120 + 1))  # past end + allowed lateness: the window is closed
        .add_elements([plain_event(2, 20)])
        .add_elements([plain_event(3, 200)])  # an on-time event elsewhere proves the stream kept flowing
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "ON_TIME", 1, Decimal("1.000"), 1),
                (180, "deep-dive-42", "ON_TIME", 1, Decimal("1.000"), 1),
            ]
        ),
    )
    pipeline.run()


def test_duplicates_across_panes_count_once():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5), plain_event(1, 5)])  # redelivered within a bundle
        .advance_processing_time(1.5)
        .add_elements([plain_event(1, 5), plain_event(2, 6)])  # and again after the early pane
        .advance_watermark_to(at(90))
        .add_elements([plain_event(2, 6)])  # and a late redelivery after the on-time pane: no late pane
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "EARLY", 1, Decimal("1.000"), 1),
                (0, "deep-dive-42", "ON_TIME", 2, Decimal("2.000"), 1),
            ]
        ),
    )
    pipeline.run()


def test_out_of_order_events_land_in_their_own_windows():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(3, 125), plain_event(1, 5), plain_event(2, 65), plain_event(4, 50)])
        .advance_watermark_to_infinity()
    )
    pipeline, panes = run_panes(stream)
    assert_that(
        panes,
        equal_to(
            [
                (0, "deep-dive-42", "ON_TIME", 2, Decimal("2.000"), 1),
                (60, "deep-dive-42", "ON_TIME", 1, Decimal("1.000"), 1),
                (120, "deep-dive-42", "ON_TIME", 1, Decimal("1.000"), 1),
            ]
        ),
    )
    pipeline.run()


def test_streaming_fires_early_and_batch_fires_once_per_window():
    # Beam's triggers compare by identity; their reprs spell out the whole configuration.
    assert repr(window_trigger(SETTINGS.windows, streaming=True)) == repr(
        trigger.AfterWatermark(early=trigger.AfterProcessingTime(1), late=trigger.AfterCount(1))
    )
    # The default trigger, so runners lift the combine (none lifts it under a count trigger).
    assert repr(window_trigger(SETTINGS.windows, streaming=False)) == repr(trigger.DefaultTrigger())


def test_settings_reject_a_dedup_horizon_shorter_than_a_window_is_open():
    with pytest.raises(ValueError, match="dedup_horizon_seconds"):
        CoreSettings(windows=WindowSettings(window_seconds=60, allowed_lateness_seconds=600), dedup_horizon_seconds=300)


def test_bigquery_gets_one_row_per_burst_of_panes_and_the_final_value_while_redis_gets_every_pane():
    from apache_beam.utils.timestamp import Timestamp

    late_events = range(3, 12)
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5)])
        .advance_processing_time(1.5)
        .add_elements([plain_event(2, 10)])
        .advance_watermark_to(at(60))
    )
    # After a resume, late data fires a pane per element, each with the window's whole value so far.
    for event_id in late_events:
        stream = stream.add_elements([plain_event(event_id, 20 + event_id)])
    # Past the window's end plus lateness, but not to infinity, where the assertion's own grouping would count
    # anything the expiry timer emits as late.
    stream = stream.advance_watermark_to(Timestamp(at(60 + 121))).advance_watermark_to_infinity()
    pipeline = streaming_pipeline()
    content = pipeline | "Content" >> beam.Create([snapshot(PODCAST, VIDEO)])
    settings = dataclasses.replace(SETTINGS, coalesce_panes_seconds=3600)
    outputs = build_core(pipeline | stream, content, settings)
    every = outputs.aggregates | "Every pane" >> beam.Map(lambda a: (a.pane_timing, a.event_count))
    coalesced = outputs.coalesced_aggregates | "Coalesced" >> beam.Map(lambda a: (a.pane_timing, a.event_count))
    final_count = 2 + len(late_events)
    late_panes = [("LATE", count) for count in range(3, final_count + 1)]
    assert_that(every, equal_to([("EARLY", 1), ("ON_TIME", 2), *late_panes]), label="Redis's panes")
    # The first pane at once; the newest of the burst when the window can no longer change.
    assert_that(coalesced, equal_to([("EARLY", 1), ("LATE", final_count)]), label="BigQuery's panes")
    pipeline.run()


def test_without_a_coalescing_interval_the_core_outputs_no_coalesced_panes():
    pipeline = streaming_pipeline()
    content = pipeline | "Content" >> beam.Create([snapshot(PODCAST)])
    stream = test_stream.TestStream().add_elements([plain_event(1, 5)]).advance_watermark_to_infinity()
    assert build_core(pipeline | stream, content, SETTINGS).coalesced_aggregates is None


def test_coalesced_panes_flush_on_a_whole_second_at_least_an_interval_after_the_last():
    # Keys whose panes were sent at different milliseconds of one second flush together, in one bundle.
    sent = [1_700_000_000_000 + offset for offset in (1, 250, 999, 1000)]
    due = [flush_due_ms(last_sent, 10_000) for last_sent in sent]
    assert due == [1_700_000_011_000, 1_700_000_011_000, 1_700_000_011_000, 1_700_000_011_000]
    for last_sent, flush_at in zip(sent, due, strict=True):
        assert flush_at % FLUSH_GRID_MS == 0
        assert last_sent + 10_000 <= flush_at < last_sent + 10_000 + FLUSH_GRID_MS


@pytest.mark.parametrize("shards", [1, 16])
def test_contents_that_share_a_state_shard_keep_their_own_totals_and_pane_indexes(shards):
    # With one shard every content of a window lives in one state cell; the rows must not tell.
    settings = dataclasses.replace(SETTINGS, windows=dataclasses.replace(SETTINGS.windows, state_shards=shards))
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5), plain_event(2, 6, content=VIDEO, user=2)])
        .advance_processing_time(1.5)
        .add_elements([plain_event(3, 10, duration_ms=2500), plain_event(4, 12, content=VIDEO, user=3)])
        .advance_watermark_to(at(60))
        .advance_watermark_to_infinity()
    )
    pipeline = streaming_pipeline()
    content = pipeline | "Content" >> beam.Create([snapshot(PODCAST, VIDEO)])
    outputs = build_core(pipeline | stream, content, settings)
    panes = outputs.aggregates | "AsTuples" >> beam.Map(
        lambda a: (a.slug, a.pane_timing, a.pane_index, a.event_count, a.engagement_seconds_sum, a.distinct_users)
    )
    assert_that(
        panes,
        equal_to(
            [
                ("deep-dive-42", "EARLY", 0, 1, Decimal("1.000"), 1),
                ("deep-dive-42", "ON_TIME", 1, 2, Decimal("3.500"), 1),
                ("launch-video", "EARLY", 0, 1, Decimal("1.000"), 1),
                ("launch-video", "ON_TIME", 1, 2, Decimal("2.000"), 2),
            ]
        ),
    )
    pipeline.run()


def test_a_state_shard_count_below_one_is_refused():
    with pytest.raises(ValueError, match="aggregate_state_shards"):
        WindowSettings(state_shards=0)


def test_a_contents_state_shard_is_the_same_in_every_process():
    # Workers must agree on it: str hash() is salted per process, crc32 is not.
    from transforms.aggregate import state_shard

    assert state_shard(("6f1c2a3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f", False), 16) == 14  # crc32 of "<id>/False"
    assert state_shard((None, True), 16) == 7
    assert {state_shard((f"content-{n}", False), 16) for n in range(200)} == set(range(16))
