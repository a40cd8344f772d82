"""The shared composition on the DirectRunner (batch): every path from raw bytes to the three outputs."""

from decimal import Decimal

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.core import CoreSettings, build_core
from pipelines.options import CoreOptions
from tests.fixtures.debezium import encode, envelope, event_row, flattened, with_schema
from tests.unit.helpers import PODCAST, VIDEO, at, plain_event, snapshot
from transforms.aggregate import WindowSettings
from transforms.model import RawRecord, SourceCoordinates, Stage

BATCH = CoreSettings(streaming=False)
KAFKA = SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=0, offset=0)


def cdc(document: dict, offset: int) -> RawRecord:
    return RawRecord(value=encode(document), source=KAFKA.model_copy(update={"offset": offset}))


def row(event_id: int, second: int, **overrides) -> dict:
    return event_row(
        **{
            "event_id": event_id,
            "content_id": str(PODCAST.id),
            "event_ts": f"2026-11-22T10:00:{second:02d}Z",
            **overrides,
        }
    )


RECORDS = [
    cdc(envelope(row(1, 1, duration_ms=150_000)), 1),
    cdc(with_schema(envelope(row(2, 2, duration_ms=-5, user_id=None))), 2),
    cdc(flattened(row(3, 3, event_type="finish", duration_ms=None, device=None)), 3),
    cdc(envelope(row(1, 1, duration_ms=150_000)), 4),  # redelivered by a connector restart
    cdc(envelope(row(4, 4, content_id=None, raw_payload=None)), 5),
    cdc(envelope(row(5, 5), op="u", before=row(5, 5)), 6),  # an update is not a new event
    cdc(envelope(None, op="d", before=row(5, 5)), 7),
    RawRecord(value=None, source=KAFKA.model_copy(update={"offset": 8})),  # tombstone
    RawRecord(value=b"\x00\x01binary", source=KAFKA.model_copy(update={"offset": 9})),
    plain_event(10, 30, content=VIDEO, duration_ms=45_000, user=2),
    plain_event(11, 31, content=None, event_type="skip"),
    plain_event(12, 65, content=VIDEO, duration_ms=90_000, user=2),
]


def test_core_graph_end_to_end():
    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | "Content" >> beam.Create([snapshot(PODCAST, VIDEO)])
        outputs = build_core(pipeline | "Records" >> beam.Create(RECORDS), content, BATCH)

        assert_that(
            outputs.enriched
            | "EventView"
            >> beam.Map(lambda e: (e.event.id, e.slug, e.engagement_seconds, e.engagement_pct, e.content_missing)),
            equal_to(
                [
                    (1, "deep-dive-42", Decimal("150.000"), Decimal("0.13"), False),  # 0.125 -> 0.13
                    (2, "deep-dive-42", None, None, False),  # negative duration
                    (3, "deep-dive-42", None, None, False),  # NULL duration
                    (4, None, Decimal("45.000"), None, True),  # NULL content_id
                    (10, "launch-video", Decimal("45.000"), Decimal("0.50"), False),
                    (12, "launch-video", Decimal("90.000"), Decimal("1.00"), False),
                ]
            ),
            label="Enriched",
        )
        assert_that(
            outputs.aggregates
            | "AggregateView"
            >> beam.Map(
                lambda a: (
                    int(a.window_start.timestamp() - at(0)),
                    a.slug,
                    a.content_missing,
                    a.event_count,
                    (a.play_count, a.pause_count, a.finish_count, a.click_count),
                    a.engagement_seconds_sum,
                    a.distinct_users,
                    a.pane_timing,
                )
            ),
            equal_to(
                [
                    (0, "deep-dive-42", False, 3, (2, 0, 1, 0), Decimal("150.000"), 1, "ON_TIME"),
                    (0, None, True, 1, (1, 0, 0, 0), Decimal("45.000"), 1, "ON_TIME"),
                    (0, "launch-video", False, 1, (1, 0, 0, 0), Decimal("45.000"), 1, "ON_TIME"),
                    (60, "launch-video", False, 1, (1, 0, 0, 0), Decimal("90.000"), 1, "ON_TIME"),
                ]
            ),
            label="Aggregates",
        )
        assert_that(
            outputs.dead_letters | "DeadLetterView" >> beam.Map(lambda d: (d.stage, d.source.describe(), d.reason)),
            equal_to(
                [
                    (
                        Stage.DECODE,
                        "kafka:cdc.public.engagement_events/0@9",
                        "not JSON: Expecting value at line 1 column 1",
                    ),
                    (Stage.DECODE, "kafka:events/0@11", "event_type 'skip' is not one of play, pause, finish, click"),
                ]
            ),
            label="DeadLetters",
        )


def test_core_options_have_help_and_build_valid_settings():
    options = PipelineOptions(["--window_seconds=120", "--allowed_lateness_seconds=60", "--dedup_horizon_seconds=300"])
    settings = CoreSettings.from_options(options, streaming=True)
    assert settings.windows == WindowSettings(120, 60, 0)  # early panes as soon as data arrives
    assert CoreSettings.from_options(options, streaming=False).streaming is False

    parser = __import__("argparse").ArgumentParser()
    CoreOptions._add_argparse_args(parser)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"


def test_core_options_reject_a_short_dedup_horizon():
    options = PipelineOptions(["--allowed_lateness_seconds=900", "--dedup_horizon_seconds=600"])
    with pytest.raises(ValueError, match="dedup_horizon_seconds"):
        CoreSettings.from_options(options, streaming=True)
