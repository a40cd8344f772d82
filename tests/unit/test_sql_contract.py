"""The SQL in sql/ and the code agree: SPEC §1 DDL verbatim, BigQuery columns equal to the rows written."""

import re
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest

from tests.unit.helpers import PODCAST, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.model import DeadLetter, SourceCoordinates, Stage, WindowAggregate
from transforms.rows import dead_letter_row, enriched_event_row, window_aggregate_row

ROOT = Path(__file__).resolve().parents[2]


def spec_ddl() -> str:
    spec = (ROOT.parent / "shared" / "SPEC.md").read_text()
    return re.search(r"```sql\n(.*?)```", spec, re.S).group(1)


def normalised(sql: str) -> list[str]:
    return [line.rstrip() for line in sql.strip().splitlines()]


def test_postgres_schema_is_the_spec_ddl_verbatim():
    schema = (ROOT / "sql" / "postgres" / "001_schema.sql").read_text()
    without_header = "\n".join(line for line in schema.splitlines() if not line.startswith("--"))
    assert normalised(without_header) == normalised(spec_ddl())


def bigquery_columns(table: str) -> list[str]:
    ddl = (ROOT / "sql" / "bigquery" / "001_tables.sql").read_text()
    body = re.search(rf"\.{table}` \((.*?)\n\)\n", ddl, re.S).group(1)
    return [line.split()[0] for line in body.strip().splitlines() if line.strip()]


def test_enriched_event_row_matches_the_table():
    enriched = enrich(decode_record(plain_event(1, 5).value).event, PODCAST)
    row = enriched_event_row(enriched, processed_at=datetime.now(UTC))
    assert list(row) == bigquery_columns("enriched_events")
    assert row["content_id"] == str(PODCAST.id)
    assert row["engagement_seconds"] == Decimal("1.000")


def test_window_aggregate_row_matches_the_table():
    now = datetime.now(UTC)
    aggregate = WindowAggregate(
        window_start=now,
        window_end=now,
        content_id=UUID(int=1),
        content_missing=False,
        title="t",
        slug="s",
        content_type=None,
        event_count=1,
        play_count=1,
        pause_count=0,
        finish_count=0,
        click_count=0,
        engagement_seconds_sum=Decimal("1.000"),
        distinct_users=1,
        pane_timing="EARLY",
        pane_index=0,
        emitted_at=now,
    )
    row = window_aggregate_row(aggregate)
    assert list(row) == bigquery_columns("window_aggregates")
    assert row["content_id"] == "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    "source",
    [
        SourceCoordinates(kind="kafka", topic="t", partition=1, offset=2),
        SourceCoordinates(kind="postgres", table="engagement_events", row_id=7),
    ],
)
def test_dead_letter_row_matches_the_table(source):
    row = dead_letter_row(DeadLetter.of(Stage.HTTP, "HTTP 400: bad batch", b"\xffraw", source, event_id=7))
    assert list(row) == bigquery_columns("dead_letters")
    assert row["payload_bytes"] == b"\xffraw"
    assert row["payload_text"] == "\ufffdraw"
