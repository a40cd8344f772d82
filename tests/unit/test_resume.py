"""Restart planning (transforms/resume.py): pure rules and the two filters, on the DirectRunner."""

from __future__ import annotations

from datetime import UTC, datetime

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.unit.helpers import PODCAST, at, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.resume import KeepResumableWindows, SkipDelivered, align_down, resume_point


def test_resume_point_goes_back_a_window_its_lateness_and_the_margin_then_aligns_down() -> None:
    last = datetime(2026, 11, 22, 10, 7, 42, 500_000, tzinfo=UTC)
    # 10:07:42.5 - (60 + 300 + 60) s = 10:00:42.5, aligned down to the minute.
    assert resume_point(last, 60, 300, 60) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert resume_point(last, 10, 30, 0) == datetime(2026, 11, 22, 10, 7, 0, tzinfo=UTC)


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
