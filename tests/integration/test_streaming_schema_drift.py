"""Issue 17 on the real stack: columns of ``engagement_events`` renamed while the streaming job runs.

Rows go through PostgreSQL, Debezium and Kafka into the job on Prism. With ``device`` renamed, events keep
flowing with ``device`` NULL and the job logs the drift; with ``event_ts`` renamed, each event is a dead
letter that names the missing column; once the names are back, events carry their device again. The job
stays up throughout. The renames are undone whatever happens, since the stack's table is shared by the
suite (tests run one at a time).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import psycopg2.errors
import pytest

from devstack import connect
from tests.integration.test_streaming_end_to_end import StreamingJob, bigquery_rows, job_args, wait_for

pytestmark = pytest.mark.integration

PER_BATCH = 5
CDC_TOPIC = connect.topic_for("public.engagement_events")
RENAMES = (("device", "device_name"), ("event_ts", "event_time"))


def insert_events(cursor, content_id: str, device_column: str, time_column: str, count: int) -> list[int]:
    ids = []
    for n in range(count):
        cursor.execute(
            f"INSERT INTO engagement_events (content_id, event_type, {time_column}, duration_ms, {device_column})"
            " VALUES (%s, 'play', %s, %s, 'ios') RETURNING id",
            (content_id, datetime.now(UTC) - timedelta(seconds=1), 1000 * (n + 1)),
        )
        ids.append(cursor.fetchone()[0])
    return ids


def rename(cursor, old: str, new: str) -> None:
    cursor.execute(f"ALTER TABLE engagement_events RENAME COLUMN {old} TO {new}")


def restore_columns(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        for original, renamed in RENAMES:
            # Never renamed, or already back: nothing to undo.
            with contextlib.suppress(psycopg2.errors.UndefinedColumn):
                rename(cursor, renamed, original)
    conn.close()


def every_partition_has_records_since(bootstrap: str, topic: str, since: datetime) -> bool:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drift-probe-{uuid.uuid4().hex[:8]}"})
    try:
        metadata = consumer.list_topics(topic, timeout=5).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            return False
        millis = int(since.timestamp() * 1000)
        wanted = [TopicPartition(topic, partition, millis) for partition in metadata.partitions]
        return all(found.offset >= 0 for found in consumer.offsets_for_times(wanted, timeout=5))
    finally:
        consumer.close()


def test_renamed_columns_flow_on_as_null_or_dead_letter_and_the_job_stays_up(private_api, dataset, bq, tmp_path):
    cfg = private_api
    run_id = uuid.uuid4().hex[:10]
    prefix, group = f"drift-{run_id}", f"drift-{run_id}"
    conn = psycopg2.connect(cfg.pg_dsn)
    conn.autocommit = True
    cursor = conn.cursor()
    content_id = str(uuid.uuid4())
    cursor.execute(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
        " VALUES (%s, %s, 'Drift', 'podcast', 60, now())",
        (content_id, f"drift-{content_id}"),
    )
    started = datetime.now(UTC) - timedelta(seconds=2)
    # KafkaIO fails a read that starts at a time no record of a partition has reached (docs/local-streaming.md,
    # "Start position"): events first, until every partition of the CDC topic has one.
    before: list[int] = []
    deadline = time.monotonic() + 60
    while not every_partition_has_records_since(cfg.kafka_bootstrap, CDC_TOPIC, started):
        assert time.monotonic() < deadline, "the CDC topic did not receive the events"
        before += insert_events(cursor, content_id, "device", "event_ts", PER_BATCH)
        time.sleep(1)
    job = StreamingJob(job_args(cfg, dataset, prefix, group, started), tmp_path / "job.log", cfg.http_api_token)

    def devices(ids: list[int]) -> dict[int, str | None]:
        sql = f"SELECT event_id, device FROM `DATASET.enriched_events` WHERE event_id IN ({','.join(map(str, ids))})"
        return {row["event_id"]: row["device"] for row in bigquery_rows(bq, cfg, dataset, sql)}

    try:
        wait_for("the events before the change in BigQuery", lambda: len(devices(before)) == len(before), 180, [job])

        rename(cursor, "device", "device_name")
        without_device = insert_events(cursor, content_id, "device_name", "event_ts", PER_BATCH)
        rename(cursor, "event_ts", "event_time")
        without_time = insert_events(cursor, content_id, "device_name", "event_time", 2)
        restore_columns(cfg.pg_dsn)
        after = insert_events(cursor, content_id, "device", "event_ts", PER_BATCH)

        everything = [*before, *without_device, *after]
        wait_for(
            "every event with event_ts in BigQuery", lambda: len(devices(everything)) == len(everything), 120, [job]
        )
        dead_sql = (
            "SELECT reason, payload_text FROM `DATASET.dead_letters` WHERE stage = 'decode'"
            f" AND failed_at >= TIMESTAMP '{started.isoformat()}'"
        )
        wait_for(
            "the events without event_ts in the dead letters",
            lambda: len(bigquery_rows(bq, cfg, dataset, dead_sql)) >= len(without_time),
            60,
            [job],
        )
        time.sleep(5)  # a retried bundle would have written twice by now
        assert job.process.poll() is None, f"the job stopped:\n{job.log()[-4000:]}"

        assert devices(everything) == {
            **dict.fromkeys(before, "ios"),
            **dict.fromkeys(without_device, None),
            **dict.fromkeys(after, "ios"),
        }
        letters = bigquery_rows(bq, cfg, dataset, dead_sql)
        assert len(letters) == len(without_time), letters
        for letter in letters:
            assert letter["reason"].startswith("missing column event_ts: the change record's row has no 'event_ts'")
        assert sorted(letter_id(letter["payload_text"]) for letter in letters) == sorted(without_time)
        assert "no longer carry column 'device'" in job.log(), job.log()[-4000:]
    finally:
        job.stop()
        restore_columns(cfg.pg_dsn)
        conn.close()


def letter_id(payload: str) -> int:
    """The event id inside a dead letter's Debezium record (``after.id``, schema-wrapped or not)."""
    document = json.loads(payload)
    envelope = document.get("payload", document) if "schema" in document else document
    return envelope["after"]["id"]
