"""The local stack's CDC path: rows written to PostgreSQL arrive on Kafka as Debezium change events.

Asserts the record shape the pipeline's decoder relies on (SPEC §2): op "c", ISO-8601 timestamps in UTC,
UUIDs and JSONB as strings, NULL columns as JSON null, and the source coordinates (table, LSN).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg2.extensions
import redis

from devstack import connect, kafka, postgres
from devstack.config import StackConfig

CONTENT_TOPIC = connect.topic_for("public.content")
EVENTS_TOPIC = connect.topic_for("public.engagement_events")


def envelope(message: dict[str, Any]) -> dict[str, Any]:
    """The change event, also when the converter wraps it as {"schema", "payload"} (STACK_CDC_SCHEMAS=true)."""
    value = message["value"]
    return value["payload"] if set(value) == {"schema", "payload"} else value


def after_field(name: str, wanted: object) -> Any:
    def matches(message: dict[str, Any]) -> bool:
        return message["value"] is not None and (envelope(message).get("after") or {}).get(name) == wanted

    return matches


def parse_ts(text: str) -> datetime:
    assert isinstance(text, str), text
    # Debezium's ZonedTimestamp: ISO-8601 in UTC with a trailing Z.
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text)


def test_inserted_rows_arrive_as_debezium_create_events(
    cdc_stack: StackConfig, pg_conn: psycopg2.extensions.connection, topic_tail: Any
) -> None:
    content_tail = topic_tail(CONTENT_TOPIC)
    events_tail = topic_tail(EVENTS_TOPIC)

    content_id = str(uuid.uuid4())
    user_id = str(uuid.uuid4())
    slug = f"it-cdc-{uuid.uuid4().hex[:12]}"
    publish_ts = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    event_ts = datetime(2024, 5, 1, 12, 3, 4, 500000, tzinfo=UTC)
    payload = {"app_version": "3.1.4", "nested": {"ok": True, "n": [1, 2]}, "unicode": "café"}

    with pg_conn.cursor() as cur:
        # length_seconds NULL: the SPEC says it may be.
        cur.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
            " VALUES (%s, %s, %s, %s, NULL, %s)",
            (content_id, slug, "Integration test episode", "podcast", publish_ts),
        )
        cur.execute(
            "INSERT INTO engagement_events"
            " (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)"
            " VALUES (%s, %s, 'play', %s, 42000, 'web-safari', %s) RETURNING id",
            (content_id, user_id, event_ts, json.dumps(payload)),
        )
        (full_id,) = cur.fetchone()
        # Every nullable column NULL.
        cur.execute(
            "INSERT INTO engagement_events"
            " (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)"
            " VALUES (NULL, NULL, NULL, %s, NULL, NULL, NULL) RETURNING id",
            (event_ts,),
        )
        (sparse_id,) = cur.fetchone()

    [content_message] = content_tail.collect(after_field("id", content_id), count=1)
    content_event = envelope(content_message)
    assert content_event["op"] == "c"
    assert content_event["before"] is None
    assert content_event["after"] == {
        "id": content_id,
        "slug": slug,
        "title": "Integration test episode",
        "content_type": "podcast",
        "length_seconds": None,
        "publish_ts": content_event["after"]["publish_ts"],
    }
    assert parse_ts(content_event["after"]["publish_ts"]) == publish_ts
    source = content_event["source"]
    assert (source["connector"], source["db"], source["schema"], source["table"]) == (
        "postgresql",
        postgres.DATABASE,
        "public",
        "content",
    )
    assert isinstance(source["lsn"], int)
    assert source["lsn"] > 0
    assert isinstance(content_event["ts_ms"], int)
    key = content_message["key"]
    assert key.get("payload", key) == {"id": content_id}

    by_id = {
        envelope(m)["after"]["id"]: m
        for m in events_tail.collect(
            lambda m: m["value"] is not None and (envelope(m).get("after") or {}).get("id") in {full_id, sparse_id},
            count=2,
        )
    }
    full = envelope(by_id[full_id])
    assert full["op"] == "c"
    assert full["before"] is None
    after = full["after"]
    assert after["content_id"] == content_id
    assert after["user_id"] == user_id
    assert after["event_type"] == "play"
    assert parse_ts(after["event_ts"]) == event_ts
    assert after["duration_ms"] == 42000
    assert after["device"] == "web-safari"
    # JSONB arrives as a JSON document inside a string, not as a nested object.
    assert isinstance(after["raw_payload"], str)
    assert json.loads(after["raw_payload"]) == payload
    assert full["source"]["table"] == "engagement_events"
    assert isinstance(full["source"]["lsn"], int)
    assert full["source"]["lsn"] > 0

    sparse = envelope(by_id[sparse_id])["after"]
    assert sparse == {
        "id": sparse_id,
        "content_id": None,
        "user_id": None,
        "event_type": None,
        "event_ts": sparse["event_ts"],
        "duration_ms": None,
        "device": None,
        "raw_payload": None,
    }
    assert parse_ts(sparse["event_ts"]) == event_ts


def test_schema_and_cdc_objects_are_in_place(cdc_stack: StackConfig, pg_conn: psycopg2.extensions.connection) -> None:
    with pg_conn.cursor() as cur:
        cur.execute("SELECT filename FROM schema_migrations ORDER BY filename")
        applied = [row[0] for row in cur.fetchall()]
        cur.execute("SELECT tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1", (connect.PUBLICATION,))
        published = [row[0] for row in cur.fetchall()]
        cur.execute("SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (connect.slot_name(cdc_stack),))
        slot = cur.fetchone()
        cur.execute("SHOW wal_level")
        (wal_level,) = cur.fetchone()
    assert applied[:2] == ["001_schema.sql", "002_cdc.sql"]
    assert published == ["content", "engagement_events"]
    assert slot == ("pgoutput",)
    assert wal_level == "logical"


def test_migrations_are_idempotent(cdc_stack: StackConfig) -> None:
    assert postgres.apply_migrations(cdc_stack) == []


def test_redis_answers(cdc_stack: StackConfig) -> None:
    client = redis.Redis.from_url(cdc_stack.redis_url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_a_missing_topic_is_created_with_the_brokers_partitions_and_an_existing_one_left_alone(
    cdc_stack: StackConfig,
) -> None:
    # What the stack does for Debezium's topics before the connector starts, so a job can read them before
    # the first change (scripts/run-local --no-generator on a fresh stack).
    from confluent_kafka.admin import AdminClient

    topic = f"test-ensure-topic-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": cdc_stack.kafka_bootstrap})
    assert topic not in admin.list_topics(timeout=10).topics

    assert kafka.ensure_topic(cdc_stack.kafka_bootstrap, topic) is True
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 4  # the broker's num.partitions
    assert kafka.ensure_topic(cdc_stack.kafka_bootstrap, topic) is False

    for name in (CONTENT_TOPIC, EVENTS_TOPIC):
        assert name in admin.list_topics(timeout=10).topics
    admin.delete_topics([topic])[topic].result(timeout=30)
