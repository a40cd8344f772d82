"""The generator against the real local stack: rows land in PostgreSQL, records land on Kafka.

Uses the session fixture ``cdc_stack`` (tests/integration/conftest.py). To try the PostgreSQL part against any
database that has sql/postgres/001_schema.sql applied, set ``GENERATOR_TEST_DSN`` instead; the Kafka test
always needs the stack.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from devstack.config import REPO_ROOT, StackConfig
from devstack.generator import GeneratorError, Kind, Options, Summary, parse_mix, run
from transforms.decode import DecodeError, decode_record

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    override = os.environ.get("GENERATOR_TEST_DSN")
    if override:
        return override
    # PostgreSQL, Kafka and Connect suffice; the BigQuery emulator and HTTP API need not start for these tests.
    return request.getfixturevalue("cdc_stack").pg_dsn


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _query(dsn: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        rows = cur.fetchall()
    conn.close()
    return rows


def test_postgres_mode_writes_the_requested_rows_with_awkward_cases(pg_dsn: str, tmp_path: Path) -> None:
    manifest, commit_log = tmp_path / "manifest.jsonl", tmp_path / "commits.jsonl"
    summary = run(
        Options(
            mode="postgres",
            rate=0,
            count=3000,
            content=30,
            seed=42,
            batch_size=250,
            mix=parse_mix("postgres", 0.36),
            dsn=pg_dsn,
            manifest=manifest,
            commit_log=commit_log,
            quiet=True,
        ),
        log=io.StringIO(),
    )
    assert summary.records == 3000

    entries = _read_jsonl(manifest)
    events = [e for e in entries if e["type"] == "event"]
    assert len(events) == 3000
    ids = [e["id"] for e in events]
    assert len(set(ids)) == 3000

    rows = _query(
        pg_dsn,
        "SELECT id, content_id::text, user_id, event_type, event_ts, duration_ms, device, raw_payload "
        "FROM engagement_events WHERE id = ANY(%s)",
        (ids,),
    )
    assert len(rows) == 3000
    by_id = {row[0]: row for row in rows}
    kinds = {e["id"]: Kind(e["kind"]) for e in events}
    column = {"content_id": 1, "user_id": 2, "event_type": 3, "duration_ms": 5, "device": 6, "raw_payload": 7}
    null_kinds = {
        Kind.NULL_CONTENT_ID: "content_id",
        Kind.NULL_USER_ID: "user_id",
        Kind.NULL_EVENT_TYPE: "event_type",
        Kind.NULL_DURATION: "duration_ms",
        Kind.NULL_DEVICE: "device",
        Kind.NULL_RAW_PAYLOAD: "raw_payload",
    }
    seen = Counter(kinds.values())
    for kind, name in null_kinds.items():
        assert seen[kind] > 0, kind
        assert all(by_id[i][column[name]] is None for i, k in kinds.items() if k is kind), kind
    assert all(by_id[i][5] < 0 for i, k in kinds.items() if k is Kind.NEGATIVE_DURATION)

    # The catalogue exists, including the special lengths the awkward kinds point at.
    lengths = dict(_query(pg_dsn, "SELECT id::text, length_seconds FROM content"))
    assert len(lengths) >= 30
    for event_id, kind in kinds.items():
        if kind is Kind.ZERO_LENGTH_CONTENT:
            assert lengths[by_id[event_id][1]] == 0
        if kind is Kind.NULL_LENGTH_CONTENT:
            assert lengths[by_id[event_id][1]] is None

    # Fresh content is committed before the events that reference it, and published before them.
    fresh_ids = [e["id"] for e in entries if e["type"] == "content" and e["kind"] == "fresh_content"]
    assert fresh_ids
    published = dict(_query(pg_dsn, "SELECT id::text, publish_ts FROM content WHERE id::text = ANY(%s)", (fresh_ids,)))
    assert set(published) == set(fresh_ids)
    position = {(e["type"], str(e["id"])): n for n, e in enumerate(entries)}
    for event_id, kind in kinds.items():
        if kind is Kind.FRESH_CONTENT:
            content_id = by_id[event_id][1]
            assert position[("content", content_id)] < position[("event", str(event_id))]
            assert published[content_id] <= by_id[event_id][4]

    # One commit-log line per transaction, covering every id, in commit order.
    commits = _read_jsonl(commit_log)
    assert sum(c["count"] for c in commits) == 3000
    assert min(c["first_id"] for c in commits) == min(ids)
    assert max(c["last_id"] for c in commits) == max(ids)
    assert [c["committed_at"] for c in commits] == sorted(c["committed_at"] for c in commits)


def test_cli_paces_to_the_requested_rate(pg_dsn: str) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "generate"), "--dsn", pg_dsn, "--rate", "2000", "--count", "6000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["records"] == 6000
    assert summary["achieved_rate"] == pytest.approx(2000, rel=0.1)
    assert elapsed >= 2.5  # paced, not as fast as possible
    assert "achieved" in result.stderr  # the per-second progress lines


def test_kafka_json_mode_produces_duplicates_and_malformed_records(
    cdc_stack: StackConfig, pg_dsn: str, tmp_path: Path
) -> None:
    from confluent_kafka import Consumer

    topic = f"generator-test-{uuid.uuid4().hex[:8]}"
    manifest = tmp_path / "manifest.jsonl"
    summary = run(
        Options(
            mode="kafka-json",
            rate=0,
            count=2000,
            content=30,
            seed=7,
            mix=parse_mix("kafka-json", 0.5),
            dsn=pg_dsn,
            bootstrap=cdc_stack.kafka_bootstrap,
            topic=topic,
            partitions=1,
            manifest=manifest,
            quiet=True,
        ),
        log=io.StringIO(),
    )
    assert summary.records == 2000

    consumer = Consumer(
        {
            "bootstrap.servers": cdc_stack.kafka_bootstrap,
            "group.id": f"{topic}-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < 2000 and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                values.append(message.value())
    finally:
        consumer.close()
    assert len(values) == 2000

    events = [e for e in _read_jsonl(manifest) if e["type"] == "event"]
    kinds = [Kind(e["kind"]) for e in events]
    assert Kind.DUPLICATE in kinds
    for value, kind in zip(values, kinds, strict=True):  # one partition keeps the produce order
        if kind.malformed:
            with pytest.raises(DecodeError):
                decode_record(value)
        else:
            assert decode_record(value).event is not None

    # A duplicate repeats an id; every other id came from the sequence and never became a row.
    ids = [e["id"] for e in events if e["id"] is not None]
    originals = [e["id"] for e in events if e["id"] is not None and e["kind"] != "duplicate"]
    assert len(set(originals)) == len(originals)
    assert len(set(ids)) < len(ids)
    assert _query(pg_dsn, "SELECT count(*) FROM engagement_events WHERE id = ANY(%s)", (originals,)) == [(0,)]


@pytest.fixture
def drifted_dsn(cdc_stack: StackConfig) -> Iterator[str]:
    """A database of the test's own with the SPEC schema, in which the test renames columns."""
    from devstack.postgres import ROLE, psql

    name = f"generator_drift_{uuid.uuid4().hex[:8]}"
    psql(cdc_stack, f"CREATE DATABASE {name} OWNER {ROLE}")
    psql(cdc_stack, (REPO_ROOT / "sql" / "postgres" / "001_schema.sql").read_text(), database=name, role=ROLE)
    yield cdc_stack.pg_dsn.replace("dbname=engagement", f"dbname={name}")
    psql(cdc_stack, f"DROP DATABASE IF EXISTS {name}")


def test_the_generator_writes_the_columns_the_table_has_and_stops_clearly_without_event_ts(
    drifted_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def generate() -> Summary:
        options = Options(mode="postgres", rate=0, count=40, content=3, seed=5, dsn=drifted_dsn, quiet=True)
        return run(options, log=io.StringIO())

    _query(drifted_dsn, "ALTER TABLE engagement_events RENAME COLUMN device TO device_name; SELECT 1")
    assert generate().records == 40
    assert "engagement_events has no column device (renamed or dropped?); writing events without it" in (
        capsys.readouterr().err
    )
    assert _query(drifted_dsn, "SELECT count(*), count(device_name) FROM engagement_events") == [(40, 0)]

    _query(drifted_dsn, "ALTER TABLE engagement_events RENAME COLUMN device_name TO device; SELECT 1")
    assert generate().records == 40
    [(rows, with_device)] = _query(drifted_dsn, "SELECT count(*), count(device) FROM engagement_events")
    assert rows == 80
    assert with_device > 0  # the column is back, and the generator writes it again

    _query(drifted_dsn, "ALTER TABLE engagement_events RENAME COLUMN event_ts TO event_time; SELECT 1")
    with pytest.raises(GeneratorError, match=r"^engagement_events has no column 'event_ts' \(renamed or dropped\?\)"):
        generate()
