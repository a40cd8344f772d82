"""The backfill's reader against real PostgreSQL: events built from typed rows equal what decoding each row's
JSON document gives, and every row the reader cannot vouch for goes through the document instead."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from devstack.config import StackConfig
from devstack.postgres import ROLE, psql
from transforms.decode import DecodeError, DecodeLimits, decode_record
from transforms.model import EngagementEvent, RawRecord
from transforms.postgres import PostgresDsn
from transforms.postgres_source import _ROW_AS_JSON, IdRange, ReadIdRangeFn, TimeRange
from transforms.secrets import SecretSource

SCHEMA = Path(__file__).resolve().parents[2] / "sql" / "postgres" / "001_schema.sql"
EVERYTHING = TimeRange(datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC))
CONTENT = "11111111-1111-4111-8111-111111111111"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# (what the row tests, columns after id, whether the reader builds the event itself)
ROWS: list[tuple[str, dict[str, Any], bool]] = [
    ("every column set", {"content_id": CONTENT, "user_id": str(uuid.uuid4()), "event_type": "play",
                          "event_ts": "2026-11-22 10:00:05.123456+00", "duration_ms": 1500, "device": "ios",
                          "raw_payload": '{"b": 1, "a": [true, null]}'}, True),
    ("only event_ts", {"event_ts": "2026-11-22 10:00:00+00"}, True),
    ("an offset and the first year", {"event_ts": "0001-01-01 05:00:00+05", "event_type": "click"}, True),
    ("INTEGER bounds", {"event_ts": "2026-11-22 10:00:00+00", "duration_ms": 2**31 - 1}, True),
    ("negative duration", {"event_ts": "2026-11-22 10:00:00+00", "duration_ms": -(2**31)}, True),
    ("text needing escapes", {"event_ts": "2026-11-22 10:00:00+00", "device": 'we"b[{\\\x01 café 🎧'}, True),
    ("JSON null payload", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": "null"}, True),
    ("scalar payloads", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": "1.5e-7"}, True),
    ("a 401-digit number", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": "[1e400, -0.0, true]"}, True),
    ("unicode keys", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": '{"é": "\\"q\\"", "a": "🎧"}'}, True),
    ("a string holding JSON", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": json.dumps('{"b":1,"a":2}')}, True),
    ("deepest payload", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": nested(63)}, True),
    # Decoding the document refuses these, or may: the reader leaves them to it.
    ("a string not holding JSON", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": '"hello"'}, False),
    ("a string nesting too deep", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": json.dumps(nested(65))},
     False),
    ("payload one level too deep", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": nested(64)}, False),
    ("a large payload", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": json.dumps({"a": "x" * 200_000})},
     False),
    ("a record over 1 MB", {"event_ts": "2026-11-22 10:00:00+00", "raw_payload": json.dumps(["y" * 1_100_000])},
     False),
]  # fmt: skip


@pytest.fixture(scope="module")
def source(stack: StackConfig) -> Iterator[str]:
    """A database of its own with the project's schema and the rows above."""
    name = f"pgsource_{uuid.uuid4().hex[:8]}"
    psql(stack, f"CREATE DATABASE {name} OWNER {ROLE}")
    dsn = stack.pg_dsn.replace("dbname=engagement", f"dbname={name}")
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(SCHEMA.read_text())
            cursor.execute(
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
                " VALUES (%s, 'c', 'C', 'video', 60, now())",
                (CONTENT,),
            )
            for _, columns, _ in ROWS:
                names = ", ".join(columns)
                marks = ", ".join(["%s"] * len(columns))
                cursor.execute(
                    f"INSERT INTO engagement_events ({names}) VALUES ({marks})",
                    list(columns.values()),
                )
    finally:
        connection.close()
    yield dsn
    psql(stack, f"DROP DATABASE IF EXISTS {name}")


def read_all(dsn: str | PostgresDsn) -> list[EngagementEvent | RawRecord]:
    reader = ReadIdRangeFn(dsn, EVERYTHING, total_rows=len(ROWS), fetch_size=5)
    reader.setup()
    try:
        reader.start_bundle()
        return list(reader.process(IdRange(low=1, high=len(ROWS) + 1, index=0, count=1)))
    finally:
        reader.teardown()


def documents(dsn: str) -> list[bytes]:
    connection = psycopg2.connect(dsn, options="-c TimeZone=UTC")
    try:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {_ROW_AS_JSON} FROM engagement_events ORDER BY id")
            return [document.encode() for (document,) in cursor.fetchall()]
    finally:
        connection.close()


def decoded_event(document: bytes) -> EngagementEvent | str:
    try:
        event = decode_record(document, DecodeLimits()).event
    except DecodeError as error:
        return f"dead letter: {error}"
    assert event is not None
    return event


def test_the_reader_builds_the_event_decoding_the_document_gives_or_hands_over_the_document(source: str) -> None:
    read = read_all(source)
    expected = documents(source)
    assert len(read) == len(expected) == len(ROWS)
    for (what, _, built), element, document in zip(ROWS, read, expected, strict=True):
        if built:
            assert isinstance(element, EngagementEvent), what
            assert element == decoded_event(document), what
            # The same fields, values and types: pydantic's equality would let 1 == 1.0 or a UUID's text pass.
            assert repr(element.model_dump()) == repr(decoded_event(document).model_dump()), what
            assert element.event_ts.tzinfo is UTC, what
        else:
            assert isinstance(element, RawRecord), what
            assert element.value == document, what
            assert element.source.describe() == f"postgres:engagement_events/{json.loads(document)['id']}", what


def test_the_reader_connects_with_a_password_read_from_its_source_not_from_the_dsn(source: str, tmp_path: Path) -> None:
    from psycopg2.extensions import make_dsn, parse_dsn

    settings = parse_dsn(source)
    password = settings.pop("password")
    without_password = make_dsn(**settings)
    password_file = tmp_path / "password"
    password_file.write_text(password + "\n")
    assert read_all(PostgresDsn(without_password, SecretSource(file_path=str(password_file)))) == read_all(source)
    # The server checks the password (scram-sha-256 over TCP): a wrong one is refused, and not echoed.
    password_file.write_text("not-the-password")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed") as refused:
        read_all(PostgresDsn(without_password, SecretSource(file_path=str(password_file))))
    assert "not-the-password" not in str(refused.value)


def test_the_rows_handed_over_are_the_ones_decoding_refuses_or_reads_its_own_way(source: str) -> None:
    outcomes = {what: decoded_event(document) for (what, _, _), document in zip(ROWS, documents(source), strict=True)}
    assert outcomes["a string not holding JSON"].startswith("dead letter: raw_payload is not valid JSON")
    assert outcomes["a string nesting too deep"].startswith("dead letter: raw_payload is not valid JSON: too deeply")
    assert outcomes["payload one level too deep"].startswith("dead letter: too deeply nested: the record")
    assert outcomes["a record over 1 MB"].startswith("dead letter: too large")
    assert outcomes["a large payload"].raw_payload == json.dumps({"a": "x" * 200_000}, separators=(",", ":"))
    assert outcomes["deepest payload"].raw_payload == nested(63)
    assert outcomes["a string holding JSON"].raw_payload == '{"a":2,"b":1}'
    assert outcomes["JSON null payload"].raw_payload is None
