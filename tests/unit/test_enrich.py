"""SPEC §3 enrichment: content metadata, missing content, and the content side input and its refresh."""

import time
from decimal import Decimal
from uuid import UUID

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to

from tests.unit.helpers import PODCAST, VIDEO, at, plain_event, snapshot
from transforms.content import ContentSnapshot, KeepNewestSnapshot, ReadContentOnce, RefreshingContent
from transforms.decode import DecodeRecords
from transforms.enrich import EnrichEvents, enrich
from transforms.model import Content, EngagementEvent

EVENT = EngagementEvent(id=1, content_id=VIDEO.id, event_ts="2026-11-22T10:00:00Z", duration_ms=45_000)


def test_enrich_adds_content_metadata_and_metrics():
    enriched = enrich(EVENT, VIDEO)
    assert (enriched.title, enriched.slug, enriched.content_type, enriched.length_seconds) == (
        "Launch video",
        "launch-video",
        "video",
        90,
    )
    assert enriched.engagement_seconds == Decimal("45.000")
    assert enriched.engagement_pct == Decimal("0.50")
    assert enriched.content_missing is False


def test_missing_content_keeps_the_event_with_null_enrichment():
    enriched = enrich(EVENT, None)
    assert enriched.event == EVENT
    assert (enriched.title, enriched.slug, enriched.content_type, enriched.length_seconds) == (None,) * 4
    assert enriched.engagement_seconds == Decimal("45.000")  # still known without content
    assert enriched.engagement_pct is None
    assert enriched.content_missing is True


def test_content_with_zero_or_null_length_gives_null_pct():
    for length in (0, None):
        content = VIDEO.model_copy(update={"length_seconds": length})
        enriched = enrich(EVENT, content)
        assert enriched.engagement_pct is None
        assert enriched.content_missing is False
        assert enriched.length_seconds == length


def test_content_with_null_content_type_is_still_content():
    enriched = enrich(EVENT, VIDEO.model_copy(update={"content_type": None}))
    assert enriched.content_type is None
    assert enriched.content_missing is False


class InMemoryLookup:
    """The point-lookup seam, backed by a dict; the PostgreSQL lookup is tested against the real database."""

    def __init__(self, known: dict[UUID, Content]) -> None:
        self._known = known

    def setup(self) -> None:
        pass

    def get(self, content_id: UUID) -> Content | None:
        return self._known.get(content_id)

    def teardown(self) -> None:
        pass


def _enriched_view(enriched):
    return enriched | beam.Map(lambda e: (e.event.id, e.slug, e.content_missing, e.engagement_pct))


def test_enrich_transform_uses_snapshot_then_lookup_and_marks_the_rest_missing():
    unknown = UUID("33333333-3333-4333-8333-333333333333")
    events = [
        EngagementEvent(id=1, content_id=PODCAST.id, event_ts="2026-11-22T10:00:00Z", duration_ms=600_000),
        EngagementEvent(id=2, content_id=VIDEO.id, event_ts="2026-11-22T10:00:00Z", duration_ms=45_000),
        EngagementEvent(id=3, content_id=unknown, event_ts="2026-11-22T10:00:00Z"),
        EngagementEvent(id=4, content_id=None, event_ts="2026-11-22T10:00:00Z"),
    ]
    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | "Content" >> beam.Create([snapshot(PODCAST)])
        enriched = (
            pipeline
            | beam.Create(events)
            | EnrichEvents(content, lookup_factory=lambda: InMemoryLookup({VIDEO.id: VIDEO}))
        ).enriched
        assert_that(
            _enriched_view(enriched),
            equal_to(
                [
                    (1, "deep-dive-42", False, Decimal("0.50")),
                    (2, "launch-video", False, Decimal("0.50")),  # created after the snapshot: found by lookup
                    (3, None, True, None),
                    (4, None, True, None),
                ]
            ),
        )


def test_read_content_once_loads_a_single_snapshot():
    with test_pipeline.TestPipeline() as pipeline:
        snapshots = pipeline | ReadContentOnce(lambda: snapshot(PODCAST, VIDEO))
        assert_that(snapshots | beam.Map(lambda s: sorted(s.rows)), equal_to([sorted([PODCAST.id, VIDEO.id])]))


def test_readers_use_the_newest_of_several_fired_snapshots():
    # The DirectRunner appends every fired pane of a global-window side input to its view (Dataflow
    # replaces it), and holds main-input bundles until the side input is complete: readers must pick
    # the newest snapshot themselves. A singleton view fails here with "more than one element".
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    retitled = PODCAST.model_copy(update={"title": "Deep Dive #42 (remastered)"})
    stream = (
        test_stream.TestStream(output_tags={"content", "events"})
        .advance_watermark_to(at(0), tag="content")
        .advance_watermark_to(at(0), tag="events")
        .add_elements([snapshot(PODCAST)], tag="content")
        .advance_processing_time(5)
        .add_elements([snapshot(retitled, VIDEO)], tag="content")  # the refresh adds the video
        .advance_processing_time(5)
        .add_elements([plain_event(1, 1, content=PODCAST), plain_event(2, 2, content=VIDEO)], tag="events")
        .advance_watermark_to_infinity(tag="content")
        .advance_watermark_to_infinity(tag="events")
    )
    pipeline = test_pipeline.TestPipeline(options=options)
    streams = pipeline | stream
    content = streams["content"] | "Newest" >> KeepNewestSnapshot()
    events = streams["events"] | DecodeRecords()
    enriched = (events.events | beam.WindowInto(beam.window.GlobalWindows()) | EnrichEvents(content)).enriched
    assert_that(
        enriched | beam.Map(lambda e: (e.event.id, e.title, e.content_missing)),
        equal_to([(1, "Deep Dive #42 (remastered)", False), (2, "Launch video", False)]),
    )
    pipeline.run()


_LOADS_SEEN: list[int] = []


def _growing_catalogue() -> ContentSnapshot:
    """Knows only the podcast at first; the video appears from the second load on, as if just published."""
    _LOADS_SEEN.append(len(_LOADS_SEEN) + 1)
    contents = (PODCAST,) if len(_LOADS_SEEN) == 1 else (PODCAST, VIDEO)
    return ContentSnapshot.of(contents, loaded_at=float(len(_LOADS_SEEN)))


def test_periodic_refresh_reloads_the_content_table_and_enrichment_sees_the_new_content():
    _LOADS_SEEN.clear()
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    started = time.time()
    with test_pipeline.TestPipeline(options=options) as pipeline:
        content = pipeline | RefreshingContent(_growing_catalogue, interval_seconds=1, stop_timestamp=started + 3)
        events = pipeline | beam.Create([plain_event(1, 1, content=VIDEO)]) | DecodeRecords()
        enriched = (events.events | EnrichEvents(content)).enriched
        assert_that(
            enriched | beam.Map(lambda e: (e.event.id, e.title, e.content_missing)),
            equal_to([(1, "Launch video", False)]),
        )
    assert len(_LOADS_SEEN) >= 2
