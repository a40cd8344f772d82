"""Issue "Sinks", done-when: real Debezium records, duplicates, bad input and a flaky HTTP API through the
whole graph into the real BigQuery emulator, Redis and HTTP API; then the whole input again, as after a
restart. Every event id lands exactly once at every sink (for the HTTP API: within a run; a whole re-run
may form other batches), and every bad input has a dead letter.

Ground truth is computed here, independently of the pipeline, from the rows inserted into PostgreSQL.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import apache_beam as beam
import redis
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core import CoreSettings, build_core
from pipelines.local_runner import prism_args
from pipelines.outputs import SinkSettings, write_outputs
from tests.integration.external_api import ExternalApiClient
from transforms.content import PostgresContentLoader, PostgresContentLookup, ReadContentOnce
from transforms.model import RawRecord, SourceCoordinates
from transforms.sinks.bigquery import LOCAL_STORAGE_WRITE, BigQuerySinkSettings
from transforms.sinks.http_api import HttpSinkSettings
from transforms.sinks.http_delivery import RetryPolicy
from transforms.sinks.http_token import TokenSource
from transforms.sinks.redis_layout import RedisKeys, read_top_content
from transforms.sinks.redis_top import RedisSinkSettings

ROOT = Path(__file__).resolve().parents[2]
CDC_TOPIC = "cdc.public.engagement_events"


def insert_content(cursor, title: str, length_seconds: int | None) -> str:
    content_id = str(uuid.uuid4())
    cursor.execute(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
        " VALUES (%s, %s, %s, 'podcast', %s, now())",
        (content_id, f"e2e-{content_id}", title, length_seconds),
    )
    return content_id


def insert_event(cursor, content_id: str | None, user: str | None, event_ts: datetime, duration_ms: int | None) -> int:
    cursor.execute(
        "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)"
        " VALUES (%s, %s, 'play', %s, %s, 'web', '{\"e2e\": true}') RETURNING id",
        (content_id, user, event_ts, duration_ms),
    )
    return cursor.fetchone()[0]


def test_every_event_once_at_every_sink_through_retries_and_a_replay(
    stack, pg_conn, topic_tail, dataset, bq, monkeypatch
):
    monkeypatch.setenv("OUTPUTS_TEST_HTTP_API_TOKEN", stack.http_api_token)  # read by the sink's setup()
    # Two minutes ago, so every event's window is inside Redis' ten-minute ranking whatever the clock does.
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=2)
    users = [str(uuid.uuid4()) for _ in range(3)]
    tail = topic_tail(CDC_TOPIC)
    truth: list[dict[str, Any]] = []
    with pg_conn.cursor() as cursor:
        popular = insert_content(cursor, "E2E popular", 600)
        niche = insert_content(cursor, "E2E niche", None)  # NULL length: pct is NULL, seconds still count
        plan = [
            (popular, users[0], 10, 120_000),
            (popular, users[1], 20, 60_000),
            (popular, users[1], 30, -5),  # negative duration: no seconds
            (niche, users[2], 40, 30_000),
            (niche, None, 50, None),  # no user, no duration
            (None, users[0], 55, 9_000),  # no content: kept, not ranked
        ]
        for content_id, user, second, duration_ms in plan:
            event_id = insert_event(cursor, content_id, user, minute + timedelta(seconds=second), duration_ms)
            truth.append({"id": event_id, "content_id": content_id, "user": user, "duration_ms": duration_ms})
        cursor.execute("SELECT nextval(pg_get_serial_sequence('engagement_events', 'id'))")
        unused_id = cursor.fetchone()[0]
    ids = [row["id"] for row in truth]

    messages = tail.collect(lambda m: m["value"] is not None and m["value"]["after"]["id"] in ids, count=len(ids))
    kafka = SourceCoordinates(kind="kafka", topic=CDC_TOPIC, partition=0, offset=0)
    records = [
        RawRecord(
            value=json.dumps(m["value"]).encode(),
            source=kafka.model_copy(update={"partition": m["partition"], "offset": m["offset"]}),
        )
        for m in messages
    ]
    records += records[:3]  # redelivered by a connector restart
    bad_inputs = {
        b"\xff\xfe not json": "not UTF-8",
        json.dumps({"id": unused_id, "event_ts": minute.isoformat(), "event_type": "skip"}).encode(): "event_type",
        json.dumps({"event_ts": minute.isoformat()}).encode(): "without 'id'",
    }
    records += [
        RawRecord(value=value, source=kafka.model_copy(update={"offset": 10_000 + index}))
        for index, value in enumerate(bad_inputs)
    ]

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    api_url = stack.http_api_url
    sinks = SinkSettings(
        bigquery=BigQuerySinkSettings(
            project=stack.bq_project,
            dataset=dataset,
            write_method=LOCAL_STORAGE_WRITE,
            endpoint=stack.bq_grpc_endpoint,
            num_streams=2,
            batch_size=4,
        ),
        redis=RedisSinkSettings(url=stack.redis_url, keys=RedisKeys(prefix), top_refresh_seconds=0),
        http=HttpSinkSettings(
            endpoint=f"{api_url}/v1/events",
            token_source=TokenSource(env_var="OUTPUTS_TEST_HTTP_API_TOKEN"),
            # One batch per shard: a replay of the same input forms the same batches, hence the same keys.
            batch_size=1_000,
            shards=3,
            retry=RetryPolicy(
                max_attempts=30, max_retry_seconds=60, initial_backoff_seconds=0.05, max_backoff_seconds=0.2
            ),
        ),
    )
    settings = CoreSettings(streaming=False)
    dsn = stack.pg_dsn

    def run_once() -> None:
        # Prism: the FnApiRunner mixes up the timers of two GroupIntoBatches in one job (both sinks batch).
        with beam.Pipeline(options=PipelineOptions(prism_args(streaming=False))) as pipeline:
            content = pipeline | ReadContentOnce(PostgresContentLoader(dsn))
            core = build_core(
                pipeline | "Records" >> beam.Create(records),
                content,
                settings,
                content_lookup=lambda: PostgresContentLookup(dsn),
            )
            write_outputs(core, sinks)

    api = ExternalApiClient(stack)
    failures_before = api.get("/v1/stats")["failures_injected"]
    api.set_faults(error_rate=0.5, seed=7)
    try:
        run_once()
        first = snapshot_sinks(stack, bq, dataset, prefix, ids, api)
        run_once()  # the same input again, as a restarted job re-reading Kafka would see it
        second = snapshot_sinks(stack, bq, dataset, prefix, ids, api)
    finally:
        api.set_faults()
        api.close()

    expected_seconds = defaultdict(Decimal)
    expected_counts = defaultdict(int)
    for row in truth:
        if row["content_id"] is not None:
            expected_counts[row["content_id"]] += 1
            if row["duration_ms"] is not None and row["duration_ms"] >= 0:
                expected_seconds[row["content_id"]] += Decimal(row["duration_ms"]) / 1000

    # Within a run the HTTP sink delivers each event once through the injected 503s (same batch, same key).
    assert first["http_receipts"] == dict.fromkeys(ids, 1), "each event stored exactly once by the HTTP API"
    # A whole second run may form other batches, hence other keys: the API then stores an event again
    # (docs/http-sink.md, "What is not guaranteed"). Nothing may be lost, though.
    assert all(count >= 1 for count in second["http_receipts"].values()), "an event missing after the replay"
    for run, state in (("first run", first), ("replay", second)):
        assert state["bigquery_ids"] == sorted(ids), f"{run}: each event exactly once in enriched_events_unique"
        assert state["top"] == [
            (popular, expected_seconds[popular], expected_counts[popular]),
            (niche, expected_seconds[niche], expected_counts[niche]),
        ]
        assert state["aggregates"] == {
            (popular, False): (3, Decimal("180.000"), 2),
            (niche, False): (2, Decimal("30.000"), 1),
            (None, True): (1, Decimal("9.000"), 1),
        }
    # Within one run the pipeline itself removes the redelivered copies: no duplicate even in the raw table.
    assert first["bigquery_raw_copies"] == dict.fromkeys(ids, 1)
    assert first["dead_letters"] == sorted(bad_inputs.values())
    assert first["http_failures_injected"] > failures_before, "the HTTP sink rode out injected 503s"


def snapshot_sinks(stack, bq, dataset, prefix, ids, api) -> dict[str, Any]:
    table = f"`{stack.bq_project}.{dataset}"
    id_list = ", ".join(str(i) for i in ids)
    unique = bq.query(f"SELECT event_id FROM {table}.enriched_events_unique` WHERE event_id IN ({id_list})").result()
    raw = bq.query(
        f"SELECT event_id, COUNT(*) AS copies FROM {table}.enriched_events` WHERE event_id IN ({id_list})"
        " GROUP BY event_id"
    ).result()
    aggregates = bq.query(
        f"SELECT content_id, content_missing, event_count, engagement_seconds_sum, distinct_users"
        f" FROM {table}.window_aggregates_current`"
    ).result()
    letters = bq.query(f"SELECT stage, reason FROM {table}.dead_letters`").result()
    receipts = api.receipts(ids)
    stats = api.get("/v1/stats")
    client = redis.Redis.from_url(stack.redis_url)
    top = read_top_content(client, prefix=prefix)
    client.close()
    reason_kinds = ("not UTF-8", "event_type", "without 'id'")
    return {
        "bigquery_ids": sorted(row["event_id"] for row in unique),
        "bigquery_raw_copies": {row["event_id"]: row["copies"] for row in raw},
        "aggregates": {
            (row["content_id"], row["content_missing"]): (
                row["event_count"],
                Decimal(row["engagement_seconds_sum"]),
                row["distinct_users"],
            )
            for row in aggregates
        },
        "dead_letters": sorted(
            next(kind for kind in reason_kinds if kind in row["reason"]) for row in letters if row["stage"] == "decode"
        ),
        "http_receipts": receipts,
        "http_failures_injected": stats["failures_injected"],
        "top": [(entry.content_id, entry.engagement_seconds, entry.event_count) for entry in top],
    }
