"""The core transforms against the real stack: Debezium's own records, and content from PostgreSQL."""

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import apache_beam as beam
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.core import CoreSettings, build_core
from transforms.content import ContentSnapshot, PostgresContentLoader, PostgresContentLookup, ReadContentOnce
from transforms.decode import Shape, decode_record
from transforms.model import RawRecord, SourceCoordinates


def insert_content(conn, length_seconds=600, content_type="podcast"):
    content_id = uuid.uuid4()
    with conn.cursor() as cursor:
        cursor.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
            " VALUES (%s, %s, %s, %s, %s, now())",
            (str(content_id), f"it-{content_id}", f"Integration {content_id.hex[:6]}", content_type, length_seconds),
        )
    return content_id


def insert_event(conn, content_id, **columns):
    values = {
        "content_id": str(content_id) if content_id else None,
        "user_id": str(uuid.uuid4()),
        "event_type": "play",
        "event_ts": datetime(2026, 11, 22, 10, 0, 30, 250000, tzinfo=UTC),
        "duration_ms": 75_000,
        "device": "web-safari",
        "raw_payload": json.dumps({"z": 1, "a": {"nested": True}}),
        **columns,
    }
    names = ", ".join(values)
    placeholders = ", ".join(["%s"] * len(values))
    with conn.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO engagement_events ({names}) VALUES ({placeholders}) RETURNING id",
            list(values.values()),
        )
        return cursor.fetchone()[0]


def test_real_debezium_records_decode_to_the_rows_postgres_holds(pg_conn, topic_tail):
    tail = topic_tail("cdc.public.engagement_events")
    content_id = insert_content(pg_conn)
    full_id = insert_event(pg_conn, content_id)
    nulls_id = insert_event(
        pg_conn, None, user_id=None, event_type=None, duration_ms=None, device=None, raw_payload=None
    )

    records = tail.collect(lambda m: m["value"] and m["value"]["after"]["id"] in (full_id, nulls_id), count=2)
    by_id = {}
    for record in records:
        raw = json.dumps(record["value"]).encode()
        decoded = decode_record(raw)
        assert decoded.shape == Shape.DEBEZIUM_ENVELOPE
        by_id[decoded.event.id] = decoded.event

    full = by_id[full_id]
    assert full.content_id == content_id
    assert full.event_ts == datetime(2026, 11, 22, 10, 0, 30, 250000, tzinfo=UTC)
    assert full.raw_payload == '{"a":{"nested":true},"z":1}'
    assert (full.event_type, full.duration_ms, full.device) == ("play", 75_000, "web-safari")

    nulls = by_id[nulls_id]
    assert (nulls.content_id, nulls.user_id, nulls.event_type, nulls.duration_ms, nulls.device, nulls.raw_payload) == (
        None,
    ) * 6


def test_content_loader_and_lookup_read_postgres(pg_conn, cdc_stack):
    content_id = insert_content(pg_conn, length_seconds=0, content_type=None)

    snapshot = PostgresContentLoader(cdc_stack.pg_dsn)()
    loaded = snapshot.get(content_id)
    assert loaded is not None
    assert (loaded.length_seconds, loaded.content_type) == (0, None)

    lookup = PostgresContentLookup(cdc_stack.pg_dsn, miss_ttl_seconds=0)
    lookup.setup()
    try:
        later = uuid.uuid4()
        assert lookup.get(later) is None  # not created yet
        with pg_conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO content (id, slug, title, publish_ts) VALUES (%s, %s, 'Just published', now())",
                (str(later), f"it-{later}"),
            )
        found = lookup.get(later)  # created a moment before its events: found without any refresh
        assert found is not None
        assert found.title == "Just published"
    finally:
        lookup.teardown()


def _stale_snapshot() -> ContentSnapshot:
    """A snapshot taken before any content existed, as if the side input had not refreshed yet."""
    return ContentSnapshot.of([], loaded_at=0.0)


def test_core_graph_enriches_content_created_after_the_snapshot(pg_conn, cdc_stack):
    settings = CoreSettings(streaming=False)
    dsn = cdc_stack.pg_dsn
    just_created = insert_content(pg_conn, length_seconds=300)
    never_created = uuid.uuid4()
    source = SourceCoordinates(kind="test")

    def event(event_id, content_id, duration_ms):
        document = {"id": event_id, "content_id": str(content_id), "event_ts": "2026-11-22T10:00:05Z"}
        return RawRecord(value=json.dumps({**document, "duration_ms": duration_ms}).encode(), source=source)

    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | ReadContentOnce(_stale_snapshot)
        raw = pipeline | beam.Create([event(9_000_001, just_created, 30_000), event(9_000_002, never_created, 1_000)])
        outputs = build_core(raw, content, settings, content_lookup=lambda: PostgresContentLookup(dsn))
        assert_that(
            outputs.enriched | beam.Map(lambda e: (e.event.id, e.content_missing, e.slug, e.engagement_pct)),
            equal_to(
                [
                    (9_000_001, False, f"it-{just_created}", Decimal("0.10")),
                    (9_000_002, True, None, None),
                ]
            ),
        )
