"""The backfill against the real stack, on the FnApiRunner (the runner scripts/backfill uses).

Each module run has its own BigQuery dataset (scripts/bigquery-ddl) and Redis prefix, and its events have
``event_ts`` in minutes of a far-future day picked at random, so nothing else in the shared PostgreSQL falls
in its ranges. Future windows also keep their Redis buckets live (a bucket older than its TTL is skipped).
"""

from __future__ import annotations

import json
import random
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import apache_beam as beam
import psycopg2
import pytest
import redis
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

from devstack.config import StackConfig
from devstack.postgres import ROLE, psql
from pipelines.backfill import main, preflight, run_chunks
from pipelines.core import CoreSettings, build_core
from pipelines.outputs import SinkSettings, write_outputs
from tests.integration.external_api import ExternalApiClient
from transforms.content import PostgresContentLoader, PostgresContentLookup, ReadContentOnce
from transforms.model import RawRecord, SourceCoordinates
from transforms.postgres_source import TimeRange
from transforms.rows import enriched_event_row, window_aggregate_row
from transforms.sinks.bigquery import LOCAL_STORAGE_WRITE, BigQuerySinkSettings
from transforms.sinks.redis_layout import RedisKeys
from transforms.sinks.redis_top import RedisSinkSettings

ROOT = Path(__file__).resolve().parents[2]
CDC_TOPIC = "cdc.public.engagement_events"


@pytest.fixture(scope="module")
def prefix(stack: StackConfig) -> Iterator[str]:
    name = f"backfill-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(stack.redis_url)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def day() -> datetime:
    """Midnight of a random day 2 to 30 years ahead: the test run's own stretch of event time."""
    offset = random.SystemRandom().randrange(2 * 365, 30 * 365)
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=offset)


@pytest.fixture(scope="module")
def db(stack: StackConfig) -> Iterator[Any]:
    connection = psycopg2.connect(stack.pg_dsn)
    connection.autocommit = True
    yield connection
    connection.close()


def insert_content(cursor, title: str, length_seconds: int | None) -> str:
    content_id = str(uuid.uuid4())
    cursor.execute(
        "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
        " VALUES (%s, %s, %s, 'video', %s, now())",
        (content_id, f"backfill-{content_id}", title, length_seconds),
    )
    return content_id


def insert_events(db, plan: list[tuple[str | None, str | None, datetime, int | None]]) -> list[int]:
    ids = []
    with db.cursor() as cursor:
        for content_id, user, event_ts, duration_ms in plan:
            cursor.execute(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,"
                " raw_payload) VALUES (%s, %s, %s, %s, %s, 'ios', %s) RETURNING id",
                (content_id, user, ("play", "pause", "finish", "click")[len(ids) % 4], event_ts, duration_ms,
                 json.dumps({"backfill_test": len(ids)})),
            )  # fmt: skip
            ids.append(cursor.fetchone()[0])
    return ids


def sample_events(db, start: datetime, minutes: int) -> list[int]:
    """A few events in each minute of ``[start, start + minutes)``, with the NULLs SPEC §1 allows."""
    with db.cursor() as cursor:
        long, unknown_length = insert_content(cursor, "Backfill long", 900), insert_content(cursor, "No length", None)
    users = [str(uuid.uuid4()) for _ in range(3)]
    plan = []
    for minute in range(minutes):
        at = start + timedelta(minutes=minute)
        plan += [
            (long, users[0], at + timedelta(seconds=1), 120_000),
            (long, users[1], at + timedelta(seconds=20, microseconds=250), 45_500),
            (unknown_length, users[minute % 3], at + timedelta(seconds=59, microseconds=999_999), None),
            (None, None, at + timedelta(seconds=30), -5),
        ]
    return insert_events(db, plan)


def backfill_options(stack: StackConfig, dataset: str, prefix: str, start: datetime, end: datetime) -> list[str]:
    return [
        "--runner=FnApiRunner",
        f"--start={start.isoformat()}",
        f"--end={end.isoformat()}",
        "--read_splits=3",
        f"--postgres_dsn={stack.pg_dsn}",
        f"--bigquery_project={stack.bq_project}",
        f"--bigquery_dataset={dataset}",
        f"--bigquery_write_method={LOCAL_STORAGE_WRITE}",
        f"--bigquery_endpoint={stack.bq_grpc_endpoint}",
        f"--bigquery_rest_endpoint={stack.bq_rest_endpoint}",
        "--bigquery_num_streams=2",
        f"--redis_url={stack.redis_url}",
        f"--redis_key_prefix={prefix}",
        "--redis_top_refresh_seconds=0",
    ]


@dataclass(frozen=True)
class BackfillRun:
    chunks: tuple[TimeRange, ...]
    """The sub-ranges run, one job each."""
    counters: dict[str, int]
    """Summed over the jobs, as ``{"namespace/name": total}``."""


def run_backfill(
    stack: StackConfig, dataset: str, prefix: str, start: datetime, end: datetime, extra: Sequence[str] = ()
) -> BackfillRun:
    """Runs a backfill as the command does: the preflight, then one job per chunk."""
    options = PipelineOptions([*backfill_options(stack, dataset, prefix, start, end), *extra])
    plan = preflight(options)
    totals = run_chunks(options, plan)
    return BackfillRun(plan.chunks, {f"{namespace}/{name}": value for (namespace, name), value in totals.items()})


class Collected:
    """Elements handed to ``add`` by an in-process runner (the FnApiRunner runs DoFns in this process)."""

    store: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self) -> None:
        self.key = uuid.uuid4().hex
        self.store[self.key] = []

    def add(self, item: Any) -> None:
        self.store[self.key].append(item)

    def items(self) -> list[Any]:
        return self.store[self.key]


def debezium_records(tail, ids: list[int]) -> list[RawRecord]:
    messages = tail.collect(lambda m: m["value"] is not None and m["value"]["after"]["id"] in ids, count=len(ids))
    return [
        RawRecord(
            value=json.dumps(m["value"]).encode(),
            source=SourceCoordinates(kind="kafka", topic=CDC_TOPIC, partition=m["partition"], offset=m["offset"]),
        )
        for m in messages
    ]


def streaming_composition(
    stack: StackConfig, records: list[RawRecord], sinks: SinkSettings | None = None
) -> tuple[list[dict], list[dict]]:
    """What the streaming job's composition makes of ``records``: enriched rows and final aggregate rows.

    The streaming job does not exist yet, so the reference is build_core over the Debezium records (the
    streaming input) in batch mode, where each window fires once with its final value. With ``sinks``, it
    also writes them as streaming would have.
    """
    enriched, aggregates = Collected(), Collected()
    dsn = stack.pg_dsn
    with beam.Pipeline(runner=FnApiRunner()) as pipeline:
        core = build_core(
            pipeline | "Records" >> beam.Create(records),
            pipeline | ReadContentOnce(PostgresContentLoader(dsn)),
            CoreSettings(streaming=False),
            content_lookup=lambda: PostgresContentLookup(dsn),
        )
        _ = core.enriched | "Keep events" >> beam.Map(enriched.add)
        _ = core.aggregates | "Keep aggregates" >> beam.Map(aggregates.add)
        if sinks is not None:
            write_outputs(core, sinks)
    now = datetime.now(UTC)
    return (
        [without(enriched_event_row(event, now), "processed_at") for event in enriched.items()],
        [without(window_aggregate_row(aggregate), "emitted_at") for aggregate in aggregates.items()],
    )


def window_value(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in ("emitted_at", "pane_timing", "pane_index")}


def without(row: dict, column: str) -> dict:
    return {key: value for key, value in row.items() if key != column}


def comparable(row: dict) -> tuple:
    """A row as sortable text; NUMERIC normalized (BigQuery returns 120 for the 120.000 written)."""
    return tuple(
        sorted((key, str(value.normalize() if isinstance(value, Decimal) else value)) for key, value in row.items())
    )


def table_rows(bq, dataset: str, table: str, where: str) -> list[dict]:
    query = f"SELECT * FROM `{bq.project}.{dataset}.{table}` WHERE {where}"
    return [dict(row) for row in bq.query_and_wait(query)]


def ids_in(ids: list[int]) -> str:
    return f"event_id IN ({', '.join(str(i) for i in ids)})"


def windows_in(start: datetime, end: datetime) -> str:
    return f"window_start >= TIMESTAMP '{start.isoformat()}' AND window_start < TIMESTAMP '{end.isoformat()}'"


def redis_state(stack: StackConfig, prefix: str) -> dict[str, Any]:
    """Every bucket key of the prefix with its members, scores and expiry (the ranking keys refresh with now).

    The ``:versions`` hashes are left out: they record when each entry was written, which a rewrite changes.
    """
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        return {
            key: (client.zrange(key, 0, -1, withscores=True), client.expiretime(key))
            for key in sorted(client.scan_iter(f"{prefix}:bucket:*"))
            if not key.endswith(":versions")
        }
    finally:
        client.close()


def test_backfill_equals_streaming_and_a_second_run_changes_nothing(
    stack, db, topic_tail, bq, dataset, prefix, day
) -> None:
    start, end = day + timedelta(hours=1), day + timedelta(hours=1, minutes=3)
    tail = topic_tail(CDC_TOPIC)
    ids = sample_events(db, start, minutes=3)
    insert_events(db, [(None, None, end, 1_000), (None, None, start - timedelta(microseconds=1), 1_000)])  # outside
    expected_events, expected_aggregates = streaming_composition(stack, debezium_records(tail, ids))
    assert len(expected_events) == 12
    assert len(expected_aggregates) == 9  # 3 minutes x (long, no length, missing content)

    # In chunks of one minute (4 rows each): one job per chunk must give what one job over the range gives,
    # which the second, unchunked run below confirms by changing nothing.
    first_run = run_backfill(stack, dataset, prefix, start, end, ["--chunk_rows=4"])
    minutes = [start + timedelta(minutes=m) for m in range(4)]
    assert first_run.chunks == tuple(map(TimeRange, minutes, minutes[1:]))
    assert first_run.counters["backfill/rows_read"] == len(ids)

    events = table_rows(
        bq, dataset, "enriched_events", f"event_ts >= TIMESTAMP '{start}' AND event_ts < TIMESTAMP '{end}'"
    )
    assert sorted(map(comparable, (without(row, "processed_at") for row in events))) == sorted(
        map(comparable, expected_events)
    )
    # One row per window; pane_timing and pane_index depend on how the runner fired it (see KeepFinalPanes).
    aggregates = table_rows(bq, dataset, "window_aggregates", windows_in(start, end))
    assert sorted(map(comparable, map(window_value, aggregates))) == sorted(
        map(comparable, map(window_value, expected_aggregates))
    )
    buckets = redis_state(stack, prefix)
    assert len(buckets) == 6  # seconds and events for each of the 3 minutes; missing content is not ranked
    first_minute = buckets[f"{prefix}:bucket:{int(start.timestamp())}"][0]
    assert sorted(score for _, score in first_minute) == [0.0, 165.5]  # "long": 120 + 45.5 s; no durations: 0

    def snapshot() -> tuple:
        return (
            sorted(map(comparable, table_rows(bq, dataset, "enriched_events", ids_in(ids)))),
            sorted(map(comparable, table_rows(bq, dataset, "window_aggregates", windows_in(start, end)))),
            sorted(map(comparable, table_rows(bq, dataset, "dead_letters", "TRUE"))),
            redis_state(stack, prefix),
        )

    first = snapshot()
    second_run = run_backfill(stack, dataset, prefix, start, end, ["--chunk_rows=0"])
    assert second_run.chunks == (TimeRange(start, end),)
    assert snapshot() == first


def test_overlapping_streaming_and_backfills_write_no_duplicates(
    stack, db, topic_tail, bq, dataset, prefix, day
) -> None:
    t0 = day + timedelta(hours=2)
    t1, t2, t3 = (t0 + timedelta(minutes=m) for m in (1, 2, 3))
    tail = topic_tail(CDC_TOPIC)
    ids = sample_events(db, t0, minutes=3)
    records = debezium_records(tail, ids)
    missed = ids[5]  # an event of [t1, t2) that streaming never saw
    streamed = [record for record in records if json.loads(record.value)["after"]["id"] != missed]
    sinks = SinkSettings(
        bigquery=BigQuerySinkSettings(
            project=stack.bq_project, dataset=dataset, write_method=LOCAL_STORAGE_WRITE,
            endpoint=stack.bq_grpc_endpoint, num_streams=2,
        ),
        redis=RedisSinkSettings(url=stack.redis_url, keys=RedisKeys(prefix), top_refresh_seconds=0),
        http=None,
    )  # fmt: skip
    streaming_composition(stack, [record for record in streamed if _before(record, t2)], sinks)

    def written() -> tuple:
        return tuple(
            sorted(map(comparable, table_rows(bq, dataset, table, where)))
            for table, where in (("enriched_events", ids_in(ids)), ("window_aggregates", windows_in(t0, t3)))
        )

    by_streaming = written()
    run_backfill(stack, dataset, prefix, t0, t1)  # entirely streamed: writes nothing
    assert written() == by_streaming
    # --skip_writes runs the same graph and counts what it would write, but writes nothing.
    dry = run_backfill(stack, dataset, prefix, t0, t3, extra=["--skip_writes"])
    assert written() == by_streaming
    assert not [name for name in dry.counters if name.startswith("sink.")]
    real = run_backfill(stack, dataset, prefix, t0, t3)  # overlaps both: fills the gap and the last minute
    for name in ("backfill/events_new", "backfill/events_already_in_bigquery", "backfill/aggregates_changed"):
        assert dry.counters[name] == real.counters[name] > 0, name

    copies: dict[int, int] = {}
    for row in table_rows(bq, dataset, "enriched_events", ids_in(ids)):
        copies[row["event_id"]] = copies.get(row["event_id"], 0) + 1
    assert copies == dict.fromkeys(ids, 1)

    panes: dict[tuple, list[dict]] = {}
    for row in table_rows(bq, dataset, "window_aggregates", windows_in(t0, t3)):
        panes.setdefault((row["window_start"], row["content_id"]), []).append(row)
    assert len(panes) == 9
    corrected = [key for key, rows in panes.items() if len(rows) > 1]
    missed_minute = t1
    assert len(corrected) == 1, "only the window streaming got wrong gets a second row"
    assert corrected[0][0] == missed_minute
    current = table_rows(bq, dataset, "window_aggregates_current", windows_in(t0, t3))
    _, reference = streaming_composition(stack, records)
    assert sorted(map(comparable, map(window_value, current))) == sorted(map(comparable, map(window_value, reference)))


def _before(record: RawRecord, instant: datetime) -> bool:
    return datetime.fromisoformat(json.loads(record.value)["after"]["event_ts"]) < instant


@pytest.fixture(scope="module")
def uncaptured_db(stack: StackConfig) -> Iterator[tuple[str, Any]]:
    """A database of its own with the project's schema but no CDC publication, and an autocommit connection.

    Streaming jobs of other sessions read the shared database's CDC topic and send what they read to the
    HTTP API too; events here reach the API only through the backfill. Ids start at a random point far
    above any the shared database hands out and below 2**53 (JSON-safe), so no other sender's ids collide.
    """
    name = f"backfill_http_{uuid.uuid4().hex[:8]}"
    first_id = random.SystemRandom().randrange(2**50, 2**53 - 2**20)
    psql(stack, f"CREATE DATABASE {name} OWNER {ROLE}")
    schema = (ROOT / "sql" / "postgres" / "001_schema.sql").read_text()
    psql(stack, f"{schema}\nALTER SEQUENCE engagement_events_id_seq RESTART WITH {first_id};", database=name, role=ROLE)
    dsn = stack.pg_dsn.replace("dbname=engagement", f"dbname={name}")
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    yield dsn, connection
    connection.close()
    psql(stack, f"DROP DATABASE IF EXISTS {name}")


def test_send_to_http_api_delivers_the_range_once_and_a_rerun_sends_nothing(
    stack, uncaptured_db, dataset, prefix, day, monkeypatch
) -> None:
    dsn, db = uncaptured_db
    start, end = day + timedelta(hours=3), day + timedelta(hours=3, minutes=2)
    ids = sample_events(db, start, minutes=2)
    outside = insert_events(db, [(None, None, end, 1_000), (None, None, start - timedelta(microseconds=1), 1_000)])
    # The sink reads its token from the environment, never from an option (docs/backfill.md).
    monkeypatch.setenv("HTTP_API_TOKEN", stack.http_api_token)
    to_api = [
        f"--postgres_dsn={dsn}",
        "--send_to_http_api",
        f"--http_api_url={stack.http_api_url}/v1/events",
        "--http_api_shards=2",
    ]
    api = ExternalApiClient(stack)
    try:
        first = run_backfill(stack, dataset, prefix, start, end, to_api).counters
        # The API keeps every id it ever stored, from every test: only this test's ids are looked at.
        assert api.receipts([*ids, *outside]) == {**dict.fromkeys(ids, 1), **dict.fromkeys(outside, 0)}
        assert first["sink.http/events_sent"] == len(ids) == 8
        assert first.get("sink.http/dead_lettered", 0) == 0

        second = run_backfill(stack, dataset, prefix, start, end, to_api).counters
        # Every event is in BigQuery now, so none is new and no batch is formed: nothing reaches the API,
        # not even a replay under a known key (the sink counts replayed batches as sent too).
        assert second.get("sink.http/events_sent", 0) == 0
        assert second.get("backfill/events_new", 0) == 0
        assert second.get("backfill/events_already_in_bigquery", 0) == len(ids)
        assert api.receipts([*ids, *outside]) == {**dict.fromkeys(ids, 1), **dict.fromkeys(outside, 0)}
    finally:
        api.close()


# --- preflight --------------------------------------------------------------------------------------------


def preflight_status(capsys, argv: list[str]) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def empty_database(stack: StackConfig) -> Iterator[str]:
    name = f"backfill_empty_{uuid.uuid4().hex[:8]}"
    psql(stack, f"CREATE DATABASE {name} OWNER {ROLE}")
    yield stack.pg_dsn.replace("dbname=engagement", f"dbname={name}")
    psql(stack, f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture(scope="module")
def drifted_database(stack: StackConfig) -> Iterator[str]:
    """The SPEC schema with ``device`` renamed, as a schema change under load leaves it."""
    name = f"backfill_drifted_{uuid.uuid4().hex[:8]}"
    psql(stack, f"CREATE DATABASE {name} OWNER {ROLE}")
    schema = (Path(__file__).resolve().parents[2] / "sql" / "postgres" / "001_schema.sql").read_text()
    rename = "ALTER TABLE engagement_events RENAME COLUMN device TO device_name;"
    psql(stack, f"{schema}\n{rename}", database=name, role=ROLE)
    yield stack.pg_dsn.replace("dbname=engagement", f"dbname={name}")
    psql(stack, f"DROP DATABASE IF EXISTS {name}")


def test_preflight_refuses_what_it_cannot_use_before_writing(
    stack, dataset, prefix, capsys, empty_database, drifted_database
) -> None:
    hour = datetime(2030, 1, 1, tzinfo=UTC)
    good = backfill_options(stack, dataset, prefix, hour, hour + timedelta(hours=1))

    status, err = preflight_status(capsys, [*good, "--start=2030-01-01T02:00:00Z"])
    assert (status, err) == (2, "backfill: error: --end (2030-01-01T01:00:00+00:00) must be after --start "
                                "(2030-01-01T02:00:00+00:00)\n")  # fmt: skip
    status, err = preflight_status(capsys, [*good, "--end=2030-02-30T00:00:00Z"])
    assert (status, err) == (2, "backfill: error: --end '2030-02-30T00:00:00Z' is not an ISO-8601 date or time\n")

    closed = "host=127.0.0.1 port=1 dbname=engagement user=engagement password=s3cret connect_timeout=2"
    status, err = preflight_status(capsys, [*good, f"--postgres_dsn={closed}"])
    assert status == 2
    assert err.startswith('backfill: error: cannot use PostgreSQL: connection to server at "127.0.0.1", port 1')
    assert err.count("\n") == 1
    assert "s3cret" not in err

    status, err = preflight_status(capsys, [*good, f"--postgres_dsn={empty_database}"])
    assert (status, err) == (2, "backfill: error: PostgreSQL has no table engagement_events, content "
                                "(apply sql/postgres/001_schema.sql)\n")  # fmt: skip

    status, err = preflight_status(capsys, [*good, f"--postgres_dsn={drifted_database}"])
    assert (status, err) == (2, "backfill: error: engagement_events has no column device (renamed or dropped?): "
                                "the backfill reads every SPEC §1 column; restore the column, or backfill from a "
                                "database that has it\n")  # fmt: skip

    status, err = preflight_status(capsys, [*good, "--bigquery_dataset=no_such_dataset"])
    assert status == 2
    assert err == (f"backfill: error: BigQuery table {stack.bq_project}.no_such_dataset.enriched_events does not "
                   "exist (create it with scripts/bigquery-ddl)\n")  # fmt: skip


def test_the_command_line_exits_2_with_one_line() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "backfill"), "--start=2030-01-01T00:00:00Z", "--end=2029-01-01T00:00:00Z"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "backfill: error: --end (2029-01-01T00:00:00+00:00) must be after --start (2030-01-01T00:00:00+00:00)"
    ]


def test_the_backfill_command_runs_quietly_from_the_suites_cache(stack: StackConfig, dataset: str, prefix: str, day):
    """The README's command, as a user runs it: it finds the Prism that scripts/fetch-beam-artifacts built into
    this run's cache (CI builds a fresh one) and says nothing about artifacts that are in place."""
    start = day.replace(hour=23)
    result = subprocess.run(
        [str(ROOT / "scripts" / "backfill"), f"--start={start.isoformat()}",
         f"--end={(start + timedelta(minutes=2)).isoformat()}", f"--bigquery_dataset={dataset}",
         f"--redis_key_prefix={prefix}"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "backfill done" in output
    assert "fetch-beam-artifacts" not in output
    assert "bootstrap:" not in output


def test_run_local_answers_help_without_fetch_noise() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "run-local"), "--help"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: scripts/run-local")
    assert result.stderr == ""
