"""The rule of transforms/dead_letters.py at every step that converts outside data: a failing element
becomes a dead letter with its stage, reason, payload and source, and the other elements go on."""

from datetime import UTC, datetime
from decimal import Decimal

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.core import CoreSettings, build_core
from tests.unit.helpers import PODCAST, plain_event, snapshot
from transforms.dead_letters import (
    DEAD_LETTER_TAG,
    PAYLOAD_EXCERPT_BYTES,
    GuardedMap,
    describe_element,
    reject,
)
from transforms.decode import DecodeError
from transforms.enrich import EnrichEvents, enrich
from transforms.model import (
    DeadLetter,
    EngagementEvent,
    EnrichedEvent,
    RawRecord,
    SourceCoordinates,
    Stage,
)
from transforms.sinks import bigquery, redis_layout
from transforms.sinks.bigquery import BigQuerySinkSettings, WriteEnrichedEvents
from transforms.sinks.http_api import HttpSinkSettings, WriteToHttpApi
from transforms.sinks.http_token import TokenSource
from transforms.sinks.redis_top import RedisSinkSettings, WriteTopContentToRedis

KAFKA = SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=3, offset=77)
TS = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def event(event_id: int, **fields) -> EngagementEvent:
    return EngagementEvent(id=event_id, content_id=PODCAST.id, event_ts=TS, **fields)


def enriched(event_id: int, **fields) -> EnrichedEvent:
    return enrich(event(event_id, **fields), None)


def _halve(value: int) -> int:
    if value % 2:
        raise ValueError(f"{value} is odd")
    return value // 2


def test_guarded_map_passes_results_on_and_turns_exceptions_into_dead_letters():
    with test_pipeline.TestPipeline() as pipeline:
        outputs = pipeline | beam.Create([2, 3, 4]) | GuardedMap(Stage.ENRICH, "test.halve", _halve)
        assert_that(outputs.converted, equal_to([1, 2]), label="Converted")
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda d: (d.stage, d.reason, d.payload_text)),
            equal_to([(Stage.ENRICH, "ValueError: 3 is odd", "3")]),
            label="DeadLetters",
        )


def test_a_rule_refusal_is_its_message_and_anything_else_keeps_its_type():
    record = RawRecord(value=b"x", source=KAFKA)
    assert reject(Stage.DECODE, record, DecodeError("not JSON: x")).reason == "not JSON: x"
    assert reject(Stage.DECODE, record, RecursionError("too deep")).reason == "RecursionError: too deep"
    assert len(reject(Stage.DECODE, record, KeyError("k" * 5000)).reason) == 1000


def test_every_element_kind_keeps_its_payload_and_source():
    payload, source, event_id = describe_element(RawRecord(value=b"\xff", source=KAFKA))
    assert (payload, source, event_id) == (b"\xff", KAFKA, None)
    payload, source, event_id = describe_element(enriched(42))
    assert (source.describe(), event_id) == ("postgres:engagement_events/42", 42)
    assert EnrichedEvent.model_validate_json(payload) == enriched(42)
    payload, source, event_id = describe_element({"event_id": 9, "event_ts": TS})
    assert (payload, source.row_id, event_id) == (b'{"event_id": 9, "event_ts": "2026-11-22 10:00:00+00:00"}', 9, 9)
    letter = DeadLetter.of(Stage.HTTP, "r", b"p", KAFKA, event_id=5)
    assert describe_element(letter) == (b"p", KAFKA, 5)


def test_a_payload_over_the_limit_is_cut_to_an_excerpt():
    record = RawRecord(value=b"a" * 100_000, source=KAFKA)
    assert reject(Stage.DECODE, record, DecodeError("too large"), payload_limit=100_000).payload_bytes == record.value
    cut = reject(Stage.DECODE, record, DecodeError("too large"), payload_limit=99_999)
    assert cut.payload_bytes == b"a" * PAYLOAD_EXCERPT_BYTES


def test_an_event_enrichment_cannot_compute_is_dead_lettered_and_the_others_are_enriched():
    # 10**30 ms cannot be a 3-place decimal in 28 digits: decimal.InvalidOperation, not a ValueError.
    events = [event(1, duration_ms=1_000), event(2, duration_ms=10**30)]
    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | "Content" >> beam.Create([snapshot(PODCAST)])
        outputs = pipeline | beam.Create(events) | EnrichEvents(content)
        assert_that(
            outputs.enriched | beam.Map(lambda e: (e.event.id, e.engagement_seconds)),
            equal_to([(1, Decimal("1.000"))]),
            label="Enriched",
        )
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda d: (d.stage, d.event_id, d.reason.split(":")[0])),
            equal_to([(Stage.ENRICH, 2, "InvalidOperation")]),
            label="DeadLetters",
        )


def test_core_dead_letters_include_enrichment_failures(monkeypatch):
    real_enrich = __import__("transforms.enrich", fromlist=["enrich"]).enrich

    def enrich_failing_on_id_2(event, content):
        if event.id == 2:
            raise ArithmeticError("boom")
        return real_enrich(event, content)

    monkeypatch.setattr("transforms.enrich.enrich", enrich_failing_on_id_2)
    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | "Content" >> beam.Create([snapshot(PODCAST)])
        raw = pipeline | beam.Create([plain_event(1, 1), plain_event(2, 2), RawRecord(value=b"[", source=KAFKA)])
        outputs = build_core(raw, content, CoreSettings(streaming=False))
        assert_that(outputs.enriched | beam.Map(lambda e: e.event.id), equal_to([1]), label="Enriched")
        assert_that(
            outputs.dead_letters | beam.Map(lambda d: (d.stage, d.event_id)),
            equal_to([(Stage.DECODE, None), (Stage.ENRICH, 2)]),
            label="DeadLetters",
        )


class _WriteNothing(beam.PTransform):
    """Stands in for the BigQuery write: accepts rows, refuses none."""

    def __init__(self, spec, settings, row_lists: bool = False) -> None:
        super().__init__()

    def expand(self, rows):
        return rows | beam.FlatMap(lambda row: [])


def test_bigquery_rows_that_cannot_be_built_are_dead_letters_of_the_sink(monkeypatch):
    real_row = bigquery.enriched_event_row

    def row_failing_on_id_2(event, processed_at):
        if event.event.id == 2:
            raise OverflowError("date value out of range")
        return real_row(event, processed_at)

    monkeypatch.setattr(bigquery, "enriched_event_row", row_failing_on_id_2)
    monkeypatch.setattr(bigquery, "WriteRows", _WriteNothing)
    settings = BigQuerySinkSettings(project="p", dataset="d")
    with test_pipeline.TestPipeline() as pipeline:
        dead = pipeline | beam.Create([enriched(1), enriched(2)]) | WriteEnrichedEvents(settings)
        assert_that(
            dead | beam.Map(lambda d: (d.stage, d.event_id, d.reason)),
            equal_to([(Stage.BIGQUERY, 2, "OverflowError: date value out of range")]),
        )


def test_redis_aggregates_that_cannot_be_converted_are_dead_letters_without_touching_redis(monkeypatch):
    from tests.unit.test_sink_redis_pure import aggregate

    def refuse_seven(seconds):
        if seconds == Decimal("7.000"):
            raise OverflowError("cannot score")
        return float(seconds)

    monkeypatch.setattr(redis_layout, "to_score", refuse_seven)
    # Port 1 is closed: a write attempt would dead-letter the aggregate with "redis unreachable" instead.
    config = RedisSinkSettings(url="redis://127.0.0.1:1/0", retry_seconds=0)
    with test_pipeline.TestPipeline() as pipeline:
        dead = pipeline | beam.Create([aggregate(seconds="7.000")]) | WriteTopContentToRedis(config)
        assert_that(
            dead | beam.Map(lambda d: (d.stage, d.reason, d.source.kind)),
            equal_to([(Stage.REDIS, "OverflowError: cannot score", "aggregate")]),
        )


@pytest.mark.parametrize("device", ["\ud800", "ok\udfff"])
def test_http_events_that_cannot_be_encoded_are_dead_letters_not_failed_batches(device):
    # Nothing is POSTed (the endpoint is closed): the only event cannot even be encoded as UTF-8 JSON.
    settings = HttpSinkSettings("http://127.0.0.1:1/events", TokenSource(env_var="PATH"), checkpoint_batches=False)
    with test_pipeline.TestPipeline() as pipeline:
        dead = pipeline | beam.Create([enriched(3, device=device)]) | WriteToHttpApi(settings)
        assert_that(
            dead | beam.Map(lambda d: (d.stage, d.event_id, d.reason.split(":")[0])),
            equal_to([(Stage.HTTP, 3, "UnicodeEncodeError")]),
        )


class _DatabaseDown:
    """A content lookup whose database is unreachable."""

    def setup(self) -> None:
        pass

    def get(self, content_id):
        raise ConnectionError("database down")

    def teardown(self) -> None:
        pass


def test_a_content_lookup_outage_fails_the_bundle_and_is_not_taken_for_bad_input():
    # I/O is never inside a guard: the runner retries the bundle, and the events are not dead-lettered.
    pipeline = test_pipeline.TestPipeline()
    content = pipeline | "Content" >> beam.Create([snapshot()])
    _ = pipeline | beam.Create([event(1)]) | EnrichEvents(content, lookup_factory=_DatabaseDown)
    with pytest.raises(Exception, match="database down"):
        pipeline.run().wait_until_finish()
