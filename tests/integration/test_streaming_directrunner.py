"""Issue 5, "DirectRunner integration test": a bounded KafkaIO read of real Debezium records from the local
broker, through the whole graph, into the real BigQuery emulator, Redis and HTTP API.

Rows are inserted into PostgreSQL (SPEC §3's awkward cases included) and, once Debezium has published them,
the job reads ``cdc.public.engagement_events`` from the point just before the inserts, plus a plain-JSON topic
of this test's own for what CDC cannot carry: an event of content that is not in the content table (the
foreign key forbids it in PostgreSQL) and records that must become dead letters. Every sink is then compared,
exactly, with values written out by hand from the inserted rows.

Runner: Beam's in-process ``FnApiRunner``, the engine ``--runner=DirectRunner`` hands cross-language pipelines
to, named directly because the DirectRunner cannot take this graph, and the core graph in its bounded mode
because the FnApiRunner cannot fire processing-time triggers. docs/local-streaming.md, "DirectRunner
integration test", has the evidence.

Re-runnable against the shared stack: unique content, event ids, consumer group, topic, dataset and Redis key
prefix, and an HTTP API instance of its own; every assertion is filtered to them, since other jobs may be
reading and writing the same CDC topic meanwhile.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import apache_beam as beam
import psycopg2.extensions
import pytest
import redis
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils.subprocess_server import SubprocessServer
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from google.cloud import bigquery

from devstack.config import StackConfig
from pipelines.streaming import build_pipeline
from tests.integration.external_api import ExternalApiClient
from transforms.sinks.redis_layout import RankingSettings, RedisKeys, read_top_content

CDC_TOPIC = "cdc.public.engagement_events"
WINDOW_SECONDS = 60
# Per split: KafkaIO's bounded read runs one reader per partition, one after the other on this runner, and
# every record it must see is already on the topic when it starts.
READ_SECONDS = 5
TIMEOUT = 10


@dataclass(frozen=True)
class ContentRow:
    key: str
    title: str
    content_type: str
    length_seconds: int | None


@dataclass(frozen=True)
class EventRow:
    """One event to insert, with its SPEC §3 metrics written out by hand."""

    content: str | None
    user: str | None
    event_type: str | None
    second: int
    duration_ms: int | None
    engagement_seconds: str | None
    engagement_pct: str | None


CONTENT = (
    ContentRow("long", "DR long episode", "podcast", 600),
    ContentRow("short", "DR short clip", "video", 30),
    ContentRow("quarter", "DR rounding", "newsletter", 40),
    ContentRow("unknown_length", "DR unknown length", "podcast", None),
)

EVENTS = (
    EventRow("long", "u1", "play", 5, 120_000, "120.000", "0.20"),
    EventRow("long", "u2", "pause", 10, 60_000, "60.000", "0.10"),
    EventRow("long", "u2", "finish", 15, None, None, None),  # NULL duration
    EventRow("long", None, None, 20, -5, None, None),  # negative duration; NULL user and type
    EventRow("short", "u1", "play", 25, 45_000, "45.000", "1.50"),  # longer than the content: not capped
    EventRow("quarter", "u3", "click", 30, 5_000, "5.000", "0.13"),  # 0.125 rounds half away from zero
    EventRow("quarter", "u3", "play", 35, 1_234, "1.234", "0.03"),
    EventRow("unknown_length", "u1", "play", 40, 30_000, "30.000", None),  # NULL length_seconds
    EventRow(None, "u2", "play", 45, 9_000, "9.000", None),  # NULL content_id
)
# Published as a plain JSON event: PostgreSQL's foreign key keeps such a row out of engagement_events.
NOT_IN_CONTENT_TABLE = EventRow("not_in_table", "u1", "play", 50, 7_000, "7.000", None)


@pytest.fixture
def json_topic(stack: StackConfig) -> Iterator[str]:
    """A topic of this test's own for plain JSON records, deleted afterwards."""
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    name = f"it.streaming-directrunner.{uuid.uuid4().hex[:12]}"
    admin.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])[name].result(TIMEOUT)
    yield name
    admin.delete_topics([name])[name].result(TIMEOUT)


@pytest.fixture
def consumer_group(stack: StackConfig) -> Iterator[str]:
    """A fresh consumer group, deleted afterwards so no committed offsets are left behind."""
    group = f"it-streaming-directrunner-{uuid.uuid4().hex[:12]}"
    yield group
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.delete_consumer_groups([group])[group].result(TIMEOUT)


def commit_end_offsets(bootstrap: str, topic: str, group: str) -> None:
    """Makes ``group`` start every partition of ``topic`` at its current end.

    KafkaIO resumes from the group's committed offsets, as a restarted job does. A start *time* would not do:
    its bounded read fails on any partition with no record after that time ("There are no messages has a
    timestamp that is greater than or equals to the target time"), and the shared topic has quiet partitions.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(topic, timeout=TIMEOUT).topics[topic]
        ends = []
        for partition in metadata.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=TIMEOUT)
            ends.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


def insert_rows(cursor: Any, minute: datetime, run: str) -> tuple[dict[str, str], dict[int, EventRow], dict[str, str]]:
    """Content and events; returns content ids by key, events by their new id, user ids by label."""
    content_ids = {}
    for row in CONTENT:
        content_id = str(uuid.uuid4())
        cursor.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
            " VALUES (%s, %s, %s, %s, %s, now())",
            (content_id, f"dr-{run}-{row.key}", row.title, row.content_type, row.length_seconds),
        )
        content_ids[row.key] = content_id
    users = {label: str(uuid.uuid4()) for label in ("u1", "u2", "u3")}
    events = {}
    for row in EVENTS:
        cursor.execute(
            "INSERT INTO engagement_events"
            " (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)"
            " VALUES (%s, %s, %s, %s, %s, 'web', '{\"it\": \"directrunner\"}') RETURNING id",
            (
                content_ids.get(row.content),
                users.get(row.user),
                row.event_type,
                minute + timedelta(seconds=row.second),
                row.duration_ms,
            ),
        )
        events[cursor.fetchone()[0]] = row
    return content_ids, events, users


def inserted_id(message: dict[str, Any]) -> int | None:
    """The row id of a Debezium record (with or without schemas), None for tombstones and deletes."""
    value = message["value"]
    if value is None:
        return None
    envelope = value["payload"] if set(value) == {"schema", "payload"} else value
    return (envelope.get("after") or {}).get("id")


def next_event_id(cursor: Any) -> int:
    """An id no engagement_events row will ever have, for events that only exist on Kafka."""
    cursor.execute("SELECT nextval(pg_get_serial_sequence('engagement_events', 'id'))")
    return cursor.fetchone()[0]


def pipeline_args(stack: StackConfig, group: str, json_topic: str, dataset: str, prefix: str) -> list[str]:
    """The streaming job's options (as devstack/run_local.py passes them), with a bounded read."""
    return [
        # Not "DirectRunner": it would hand this graph to its legacy engine, which refuses cross-language
        # transforms. Not "--streaming": the FnApiRunner's GroupByKey cannot fire processing-time triggers.
        "--runner=FnApiRunner",
        f"--bootstrap_servers={stack.kafka_bootstrap}",
        f"--cdc_topic={CDC_TOPIC}",
        f"--json_topic={json_topic}",
        f"--consumer_group={group}",
        "--start_offset=earliest",  # where the group has no offset: this test's JSON topic
        "--commit_offsets=false",
        f"--kafka_max_read_seconds={READ_SECONDS}",
        "--kafka_java_loopback_worker=true",
        f"--postgres_dsn={stack.pg_dsn}",
        "--content_refresh_seconds=0",
        f"--window_seconds={WINDOW_SECONDS}",
        f"--bigquery_project={stack.bq_project}",
        f"--bigquery_dataset={dataset}",
        "--bigquery_write_method=local_storage_write",
        f"--bigquery_endpoint={stack.bq_grpc_endpoint}",
        f"--redis_url={stack.redis_url}",
        f"--redis_key_prefix={prefix}",
        f"--http_api_url={stack.http_api_url}/v1/events",
    ]


def run_pipeline(args: list[str]) -> None:
    options = PipelineOptions(args)
    # The Java worker runs inside the expansion service's JVM, which must outlive the run, not just expansion.
    with SubprocessServer.cache_subprocesses(), beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, options)


def query(bq: bigquery.Client, sql: str) -> list[dict[str, Any]]:
    return [dict(row.items()) for row in bq.query_and_wait(sql)]


def test_bounded_kafka_read_through_the_whole_graph_into_every_sink(
    private_api: StackConfig,
    pg_conn: psycopg2.extensions.connection,
    topic_tail: Any,
    dataset: str,
    bq: bigquery.Client,
    json_topic: str,
    consumer_group: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = private_api  # the shared stack, but its HTTP API is this test's own
    started = time.monotonic()
    run = uuid.uuid4().hex[:8]
    # Two minutes ago: inside Redis' ten-minute ranking and bucket TTL whatever the clock does meanwhile.
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    commit_end_offsets(stack.kafka_bootstrap, CDC_TOPIC, consumer_group)
    tail = topic_tail(CDC_TOPIC)
    with pg_conn.cursor() as cursor:
        content_ids, events, users = insert_rows(cursor, minute, run)
        plain_id = next_event_id(cursor)
        wrong_type_id = next_event_id(cursor)
    content_ids["not_in_table"] = str(uuid.uuid4())
    events[plain_id] = NOT_IN_CONTENT_TABLE
    cdc_ids = set(events) - {plain_id}

    bad_records = {b"\xff\xfe not json": "not UTF-8"}
    wrong_type = {"id": wrong_type_id, "event_ts": minute.isoformat(), "event_type": "skip"}
    bad_records[json.dumps(wrong_type).encode()] = "event_type 'skip' is not one of"
    plain = {
        "id": plain_id,
        "content_id": content_ids["not_in_table"],
        "user_id": users["u1"],
        "event_type": "play",
        "event_ts": (minute + timedelta(seconds=NOT_IN_CONTENT_TABLE.second)).isoformat(),
        "duration_ms": NOT_IN_CONTENT_TABLE.duration_ms,
    }
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for value in [json.dumps(plain).encode(), *bad_records]:
        producer.produce(json_topic, value=value)
    assert producer.flush(TIMEOUT) == 0

    # Only once Debezium has published every row does a bounded read find them all.
    tail.collect(lambda message: inserted_id(message) in cdc_ids, count=len(cdc_ids))
    published = time.monotonic()

    prefix = f"it-dr-{run}"
    monkeypatch.setenv("HTTP_API_TOKEN", stack.http_api_token)
    run_pipeline(pipeline_args(stack, consumer_group, json_topic, dataset, prefix))
    finished = time.monotonic()

    # BigQuery enriched_events: each event exactly once, with SPEC §3's metrics and the content it names.
    table = f"`{stack.bq_project}.{dataset}"
    id_list = ", ".join(str(event_id) for event_id in sorted(events))
    rows = query(bq, f"SELECT * FROM {table}.enriched_events` WHERE event_id IN ({id_list})")
    assert sorted(row["event_id"] for row in rows) == sorted(events), "each event once in enriched_events"
    titles = {row.key: row for row in CONTENT}
    actual = {
        row["event_id"]: (
            row["content_id"],
            row["user_id"],
            row["event_type"],
            row["event_ts"],
            row["duration_ms"],
            row["engagement_seconds"],
            row["engagement_pct"],
            row["title"],
            row["content_type"],
            row["length_seconds"],
            row["slug"],
            row["content_missing"],
        )
        for row in rows
    }
    expected = {}
    for event_id, event in events.items():
        content = titles.get(event.content or "")
        expected[event_id] = (
            content_ids.get(event.content),
            users.get(event.user),
            event.event_type,
            minute + timedelta(seconds=event.second),
            event.duration_ms,
            None if event.engagement_seconds is None else Decimal(event.engagement_seconds),
            None if event.engagement_pct is None else Decimal(event.engagement_pct),
            content.title if content else None,
            content.content_type if content else None,
            content.length_seconds if content else None,
            f"dr-{run}-{content.key}" if content else None,
            content is None,
        )
    assert actual == expected

    # Window aggregates: one current row per content this test inserted, in the one window of its events.
    expected_aggregates = {}
    for key, content_id in content_ids.items():
        mine = [event for event in events.values() if event.content == key]
        expected_aggregates[content_id] = {
            "window_start": minute,
            "content_missing": key == "not_in_table",
            "title": titles[key].title if key in titles else None,
            "event_count": len(mine),
            "play_count": sum(event.event_type == "play" for event in mine),
            "pause_count": sum(event.event_type == "pause" for event in mine),
            "finish_count": sum(event.event_type == "finish" for event in mine),
            "click_count": sum(event.event_type == "click" for event in mine),
            "engagement_seconds_sum": sum(
                (Decimal(event.engagement_seconds) for event in mine if event.engagement_seconds), Decimal("0")
            ),
            "distinct_users": len({event.user for event in mine if event.user is not None}),
        }
    quoted = ", ".join(f"'{content_id}'" for content_id in content_ids.values())
    current = query(
        bq,
        f"SELECT content_id, {', '.join(expected_aggregates[content_ids['long']])}"
        f" FROM {table}.window_aggregates_current` WHERE content_id IN ({quoted})",
    )
    assert {row.pop("content_id"): row for row in current} == expected_aggregates
    # The NULL-content event shares its (window, NULL) row with whatever else this run read from the shared
    # topic, so only its presence is exact.
    [null_content] = query(
        bq,
        f"SELECT event_count FROM {table}.window_aggregates_current`"
        f" WHERE content_id IS NULL AND window_start = TIMESTAMP '{minute.isoformat()}'",
    )
    assert null_content["event_count"] >= 1

    # Redis: this window's bucket scores, event counts and titles; unknown content is never ranked.
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        keys = RedisKeys(prefix)
        start = int(minute.timestamp())
        ranked = {key: content_ids[key] for key in titles}
        pipe = client.pipeline(transaction=False)
        pipe.zmscore(keys.bucket(start), [*ranked.values(), content_ids["not_in_table"]])
        pipe.zmscore(keys.bucket_events(start), list(ranked.values()))
        for content_id in ranked.values():
            pipe.hget(keys.content(content_id), "title")
        scores, counts, *redis_titles = pipe.execute()
        top = read_top_content(client, prefix=prefix, n=10_000, ranking=RankingSettings(WINDOW_SECONDS))
    finally:
        client.close()
    assert scores == [float(expected_aggregates[cid]["engagement_seconds_sum"]) for cid in ranked.values()] + [None]
    assert counts == [float(expected_aggregates[cid]["event_count"]) for cid in ranked.values()]
    assert redis_titles == [titles[key].title for key in ranked]
    mine_in_top = {
        entry.content_id: (entry.title, entry.engagement_seconds, entry.event_count)
        for entry in top
        if entry.content_id in content_ids.values()
    }
    assert mine_in_top == {
        cid: (
            expected_aggregates[cid]["title"],
            expected_aggregates[cid]["engagement_seconds_sum"],
            expected_aggregates[cid]["event_count"],
        )
        for cid in ranked.values()
    }

    # HTTP API: every event of this test stored exactly once.
    api = ExternalApiClient(stack)
    try:
        assert api.receipts(events) == dict.fromkeys(events, 1), "each event stored once by the HTTP API"
        assert api.receipts([wrong_type_id]) == {wrong_type_id: 0}
    finally:
        api.close()

    # Dead letters: the two bad records of this test's topic, with their coordinates and bytes.
    letters = query(
        bq,
        f"SELECT stage, reason, payload_bytes, source_kind, source_offset FROM {table}.dead_letters`"
        f" WHERE source_topic = '{json_topic}' ORDER BY source_offset",
    )
    bad = list(bad_records.items())
    assert [(row["stage"], row["source_kind"], row["source_offset"], row["payload_bytes"]) for row in letters] == [
        ("decode", "kafka", 1, bad[0][0]),
        ("decode", "kafka", 2, bad[1][0]),
    ]
    for row, (_, reason) in zip(letters, bad, strict=True):
        assert reason in row["reason"]

    print(
        f"\nstreaming DirectRunner test: Debezium published after {published - started:.1f}s,"
        f" pipeline ran {finished - published:.1f}s, total {time.monotonic() - started:.1f}s"
    )
