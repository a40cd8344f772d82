"""Backfill reading: argument checks, id splits and the row -> raw record mapping (no database)."""

import json
from datetime import UTC, datetime
from uuid import UUID

import pytest

from transforms.decode import decode_record
from transforms.postgres_source import IdRange, RangeSummary, TimeRange, row_to_raw_record, split_id_range


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-11-22T10:00:00Z", "2026-11-22T09:00:00Z", "must be after"),
        ("2026-11-22T10:00:00Z", "2026-11-22T10:00:00Z", "must be after"),
        ("yesterday", "2026-11-22T10:00:00Z", "--start 'yesterday' is not an ISO-8601"),
        ("2026-11-22T10:00:00Z", "2026-13-40", "--end '2026-13-40' is not an ISO-8601"),
        ("2026-11-22T10:00:00", "2026-11-22T11:00:00Z", "need a UTC offset"),
    ],
)
def test_bad_time_ranges_are_refused_with_a_clear_message(start, end, message):
    with pytest.raises(ValueError, match=message):
        TimeRange.parse(start, end)


def test_time_range_is_half_open_and_accepts_offsets():
    time_range = TimeRange.parse("2026-11-22T00:00:00+01:00", "2026-11-22T00:00:00Z")
    assert time_range.start == datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


def test_splits_cover_every_id_exactly_once():
    ranges = split_id_range(RangeSummary(rows=1000, min_id=101, max_id=1100), splits=7)
    covered = [i for r in ranges for i in range(r.low, r.high)]
    assert covered == list(range(101, 1101))
    assert len(ranges) == 7


def test_fewer_ids_than_splits_gives_one_split_per_id():
    assert split_id_range(RangeSummary(rows=2, min_id=5, max_id=6), splits=16) == [
        IdRange(5, 6, 0, 2),
        IdRange(6, 7, 1, 2),
    ]


def test_an_empty_range_has_no_splits():
    assert split_id_range(RangeSummary(rows=0, min_id=None, max_id=None), splits=8) == []


def test_splits_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        split_id_range(RangeSummary(rows=1, min_id=1, max_id=1), splits=0)


def test_a_row_decodes_to_the_event_streaming_would_produce():
    # What json_build_object(...)::text returns for a row, in a UTC session: PostgreSQL trims trailing zeros
    # of the fraction and writes JSONB as nested JSON.
    document = (
        '{"id" : 42, "content_id" : "11111111-1111-4111-8111-111111111111", "user_id" : null, '
        '"event_type" : "finish", "event_ts" : "2026-11-22T10:00:05.12345+00:00", "duration_ms" : 1500, '
        '"device" : null, "raw_payload" : {"b": 1, "a": [true]}}'
    )
    record = row_to_raw_record(42, document)
    assert record.source.describe() == "postgres:engagement_events/42"
    event = decode_record(record.value).event
    assert event.id == 42
    assert event.content_id == UUID("11111111-1111-4111-8111-111111111111")
    assert event.user_id is None
    assert event.event_ts == datetime(2026, 11, 22, 10, 0, 5, 123450, tzinfo=UTC)
    assert event.raw_payload == '{"a":[true],"b":1}'  # the canonical text Debezium's string also becomes
    assert json.loads(record.value)["event_type"] == "finish"
