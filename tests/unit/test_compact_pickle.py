"""Records survive Beam's pickle-based encoding exactly, in the compact form (transforms/compact_pickle.py)."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from uuid import uuid4

import pytest
from apache_beam.coders import FastPrimitivesCoder, PickleCoder

from transforms.model import (
    Content,
    DeadLetter,
    EngagementEvent,
    EnrichedEvent,
    RawRecord,
    SourceCoordinates,
    Stage,
    WindowAggregate,
)

EVENT = EngagementEvent(
    id=42,
    content_id=uuid4(),
    user_id=uuid4(),
    event_type="play",
    event_ts=datetime(2026, 12, 4, 10, 0, 0, 123456, tzinfo=UTC),
    duration_ms=30_000,
    device="ios",
    raw_payload='{"a":1}',
    committed_at_ms=1_764_842_400_000,
)
BARE_EVENT = EngagementEvent(id=-7, event_ts=datetime(1960, 1, 1, tzinfo=UTC))
ENRICHED = EnrichedEvent(
    event=EVENT,
    engagement_seconds=Decimal("30.000"),
    engagement_pct=Decimal("0.0500"),
    content_type="podcast",
    length_seconds=600,
    title="Títle ✓",
    slug="title",
    content_missing=False,
)
RECORDS = [
    EVENT,
    BARE_EVENT,
    ENRICHED,
    EnrichedEvent(
        event=BARE_EVENT,
        engagement_seconds=None,
        engagement_pct=None,
        content_type=None,
        length_seconds=None,
        title=None,
        slug=None,
        content_missing=True,
    ),
    # A datetime in another zone keeps its zone; one without a zone stays without.
    Content(id=uuid4(), slug="s", title="t", publish_ts=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2)))),
    Content.model_construct(id=uuid4(), slug="s", title="t", publish_ts=datetime(2026, 1, 1)),
    RawRecord(value=b"\x00\xff", key=None, source=SourceCoordinates(kind="kafka", topic="t", partition=3, offset=9)),
    DeadLetter.of(Stage.DECODE, "bad", b"{", SourceCoordinates(kind="postgres", table="engagement_events", row_id=1)),
    WindowAggregate(
        window_start=datetime(2026, 12, 4, 10, 0, tzinfo=UTC),
        window_end=datetime(2026, 12, 4, 10, 1, tzinfo=UTC),
        content_id=None,
        content_missing=True,
        title=None,
        slug=None,
        content_type=None,
        event_count=3,
        play_count=1,
        pause_count=1,
        finish_count=1,
        click_count=0,
        engagement_seconds_sum=Decimal("12.500"),
        distinct_users=2,
        pane_timing="EARLY",
        pane_index=0,
        emitted_at=datetime(2026, 12, 4, 10, 0, 5, tzinfo=UTC),
    ),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda record: type(record).__name__)
@pytest.mark.parametrize("coder", [FastPrimitivesCoder(), PickleCoder()], ids=["fast primitives", "pickle"])
def test_records_round_trip_exactly(record, coder):
    copy = coder.decode(coder.encode(record))
    assert copy == record
    assert type(copy) is type(record)
    assert copy.model_dump() == record.model_dump()
    assert copy.model_fields_set == record.model_fields_set
    for name, value in record:
        assert type(getattr(copy, name)) is type(value), name
    if isinstance(record, Content) and record.publish_ts is not None:
        assert copy.publish_ts.tzinfo == record.publish_ts.tzinfo
    assert hash(copy) == hash(record)


def test_fields_left_at_their_default_stay_unset():
    copy = PickleCoder().decode(PickleCoder().encode(BARE_EVENT))
    assert copy.model_fields_set == {"id", "event_ts"}
    assert copy.model_dump(exclude_unset=True) == BARE_EVENT.model_dump(exclude_unset=True)


def test_enums_come_back_as_enums():
    letter = PickleCoder().decode(PickleCoder().encode(RECORDS[7]))
    assert letter.stage is Stage.DECODE


def test_the_compact_form_is_small():
    # pydantic's own pickle form of this record took 735 bytes (its dict, each UUID, datetime and Decimal by
    # class reference, and the model's bookkeeping).
    assert len(pickle.dumps(ENRICHED)) < 300


# --- the hot paths' shortcuts ---


def test_a_trusted_model_equals_the_validated_one_and_travels_the_same():
    trusted = EnrichedEvent.trusted(**{name: getattr(ENRICHED, name) for name in EnrichedEvent.model_fields})
    assert trusted == ENRICHED
    assert trusted.model_dump() == ENRICHED.model_dump()
    assert trusted.model_fields_set == ENRICHED.model_fields_set
    assert pickle.loads(pickle.dumps(trusted)) == ENRICHED  # noqa: S301 - our own bytes
    with pytest.raises(ValueError, match="frozen"):
        trusted.content_missing = True


def test_the_postgres_row_record_equals_its_validated_form():
    from transforms.postgres_source import row_to_raw_record

    record = row_to_raw_record(7, '{"id":7}')
    expected = RawRecord(
        value=b'{"id":7}', source=SourceCoordinates(kind="postgres", table="engagement_events", row_id=7)
    )
    assert record == expected
    assert record.model_dump() == expected.model_dump()


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 4, 10, 0, 0, 123456, tzinfo=UTC),
        datetime(1960, 1, 1, tzinfo=UTC),
        datetime(2026, 12, 4, 11, 0, 0, 654321, tzinfo=timezone(timedelta(hours=1))),
    ],
)
def test_the_fast_beam_timestamp_is_beams_own(moment):
    from apache_beam.utils.timestamp import Timestamp

    from transforms.instants import beam_timestamp

    assert beam_timestamp(moment) == Timestamp.from_utc_datetime(moment.astimezone(UTC))


@pytest.mark.parametrize("micros", [1_796_553_000_123_456, 0, -315_619_200_000_000])
def test_window_bounds_are_beams_instants_in_the_standard_librarys_utc(micros):
    from apache_beam.utils.timestamp import Timestamp

    from transforms.instants import utc_datetime

    bound = utc_datetime(micros)
    assert bound == Timestamp(micros=micros).to_utc_datetime(has_tz=True)
    assert bound.tzinfo is UTC


def test_a_window_aggregate_pickles_its_bounds_as_integers():
    from apache_beam.transforms.window import IntervalWindow
    from apache_beam.utils.timestamp import Timestamp
    from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

    from transforms.aggregate import EngagementTotals, to_window_aggregate

    window = IntervalWindow(Timestamp(micros=1_796_553_000_000_000), Timestamp(micros=1_796_553_060_000_000))
    pane = PaneInfo(True, False, PaneInfoTiming.EARLY, 0, 0)
    emitted = datetime(2026, 12, 4, tzinfo=UTC)
    row = to_window_aggregate((str(uuid4()), False), EngagementTotals(), window, pane, emitted)
    # pytz's UTC (Beam's to_utc_datetime) would leave the bounds as whole datetimes in the pickle.
    assert b"pytz" not in pickle.dumps(row)
    assert pickle.loads(pickle.dumps(row)) == row  # noqa: S301 - the test's own bytes
