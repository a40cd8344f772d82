"""SPEC §2: every input shape, op and malformation, through the pure decoder and through the DoFn."""

from datetime import UTC, datetime
from uuid import UUID

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.fixtures.debezium import encode, envelope, event_row, flattened, with_schema
from transforms.decode import (
    DEAD_LETTER_TAG,
    DecodeError,
    DecodeLimits,
    DecodeRecords,
    DecodeRecordsFn,
    Shape,
    SkipReason,
    decode_record,
    json_depth_exceeds,
)
from transforms.model import EngagementEvent, RawRecord, SourceCoordinates, Stage

EXPECTED = EngagementEvent(
    id=1042,
    content_id=UUID("6f1c2a3e-1d2b-4c5d-8e9f-0a1b2c3d4e5f"),
    user_id=UUID("0b7e4c1a-9f2d-4e3b-a1c5-d6e7f8091a2b"),
    event_type="play",
    event_ts=datetime(2026, 11, 22, 10, 15, 30, 123456, tzinfo=UTC),
    duration_ms=45000,
    device="ios",
    raw_payload='{"app_version":"5.2.1","position_ms":120000}',
    committed_at_ms=1795342530125,  # source.ts_ms (or __source_ts_ms): freshness metrics only
)


@pytest.mark.parametrize(
    ("value", "shape"),
    [
        (encode(envelope(event_row())), Shape.DEBEZIUM_ENVELOPE),
        (encode(envelope(event_row(), op="r")), Shape.DEBEZIUM_ENVELOPE),
        (encode(with_schema(envelope(event_row()))), Shape.DEBEZIUM_WITH_SCHEMA),
        (encode(with_schema(envelope(event_row(), op="r"))), Shape.DEBEZIUM_WITH_SCHEMA),
        (encode(flattened(event_row())), Shape.DEBEZIUM_FLATTENED),
        (encode(flattened(event_row(), op="r")), Shape.DEBEZIUM_FLATTENED),
        (encode(with_schema(flattened(event_row()))), Shape.DEBEZIUM_WITH_SCHEMA),
    ],
    ids=["envelope-c", "envelope-r", "schema-c", "schema-r", "flat-c", "flat-r", "schema-flat-c"],
)
def test_every_debezium_shape_decodes_to_the_same_event(value, shape):
    decoded = decode_record(value)
    assert decoded.shape == shape
    assert decoded.skip is None
    assert decoded.event == EXPECTED


def test_flattened_record_without_metadata_fields_is_a_plain_row():
    # ExtractNewRecordState with no add.fields leaves only the columns: indistinguishable from, and
    # decoded as, a plain JSON event.
    decoded = decode_record(encode(event_row()))
    assert decoded.shape == Shape.PLAIN_JSON
    assert decoded.event == EXPECTED.model_copy(update={"committed_at_ms": None})


def test_every_nullable_column_may_be_null():
    row = event_row(content_id=None, user_id=None, event_type=None, duration_ms=None, device=None, raw_payload=None)
    for value in (encode(envelope(row)), encode(flattened(row)), encode(row)):
        event = decode_record(value).event
        assert event is not None
        assert (event.content_id, event.user_id, event.event_type, event.duration_ms, event.device) == (
            None,
            None,
            None,
            None,
            None,
        )
        assert event.raw_payload is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, SkipReason.TOMBSTONE),
        (b"", SkipReason.TOMBSTONE),
        (encode(with_schema(None)), SkipReason.TOMBSTONE),
        (encode(envelope(event_row(duration_ms=9), op="u", before=event_row())), SkipReason.UPDATE),
        (encode(envelope(None, op="d", before=event_row())), SkipReason.DELETE),
        (encode(with_schema(envelope(None, op="d", before=event_row()))), SkipReason.DELETE),
        (encode(envelope(None, op="t")), SkipReason.TRUNCATE),
        (encode(flattened(event_row(), op="u")), SkipReason.UPDATE),
        (encode(flattened(event_row(), op="d", deleted=True)), SkipReason.DELETE),
        (encode(envelope({"id": "x"}, table="content")), SkipReason.OTHER_TABLE),
        (encode(flattened({"id": "x"}, table="content")), SkipReason.OTHER_TABLE),
    ],
    ids=[
        "null-value",
        "empty-value",
        "schema-null-payload",
        "op-u",
        "op-d",
        "schema-op-d",
        "op-t",
        "flat-op-u",
        "flat-deleted",
        "content-table",
        "flat-content-table",
    ],
)
def test_updates_deletes_and_tombstones_are_skipped_not_dead_lettered(value, reason):
    decoded = decode_record(value)
    assert decoded.event is None
    assert decoded.skip == reason


@pytest.mark.parametrize(
    ("row", "expected_ts"),
    [
        ({"event_ts": "2026-11-22T10:15:30Z"}, datetime(2026, 11, 22, 10, 15, 30, tzinfo=UTC)),
        ({"event_ts": "2026-11-22T11:15:30+01:00"}, datetime(2026, 11, 22, 10, 15, 30, tzinfo=UTC)),
        ({"event_ts": 1795342530123}, datetime(2026, 11, 22, 10, 15, 30, 123000, tzinfo=UTC)),
    ],
    ids=["iso-z", "iso-offset", "epoch-millis"],
)
def test_plain_json_event_ts_forms(row, expected_ts):
    event = decode_record(encode({"id": 7, **row})).event
    assert event is not None
    assert event.event_ts == expected_ts


def test_plain_json_raw_payload_object_and_string_are_canonicalised_alike():
    as_object = decode_record(encode({"id": 1, "event_ts": 0, "raw_payload": {"b": [1, 2], "a": "é"}})).event
    as_string = decode_record(encode({"id": 1, "event_ts": 0, "raw_payload": '{ "a": "é", "b": [1,2] }'})).event
    assert as_object.raw_payload == as_string.raw_payload == '{"a":"é","b":[1,2]}'


@pytest.mark.parametrize(
    ("value", "reason_fragment"),
    [
        (b"\x00\x01not json", "not JSON"),
        (b"\xff\xfe\xfd", "not UTF-8"),
        (b"{truncated", "not JSON"),
        (b"[1, 2, 3]", "unknown shape"),
        (b'"a string"', "unknown shape"),
        (b"42", "unknown shape"),
        (encode({"event_ts": "2026-11-22T10:15:30Z", "content_id": None}), "without 'id'"),
        (encode({"id": None, "event_ts": "2026-11-22T10:15:30Z"}), "missing id"),
        (encode({"id": 1}), "missing event_ts"),
        (encode({"id": "1042", "event_ts": "2026-11-22T10:15:30Z"}), "id"),
        (encode({"id": 1.5, "event_ts": "2026-11-22T10:15:30Z"}), "id"),
        (encode({"id": True, "event_ts": "2026-11-22T10:15:30Z"}), "id"),
        (encode({"id": 1, "event_ts": "yesterday"}), "not ISO-8601"),
        (encode({"id": 1, "event_ts": "2026-11-22T10:15:30"}), "no UTC offset"),
        (encode({"id": 1, "event_ts": True}), "boolean"),
        (encode({"id": 1, "event_ts": 10**20}), "out of range"),
        (encode({"id": 1, "event_ts": [2026]}), "neither ISO-8601"),
        (encode({"id": 1, "event_ts": 0, "content_id": "not-a-uuid"}), "content_id"),
        (encode({"id": 1, "event_ts": 0, "user_id": "6f1c2a3e-1d2b"}), "user_id"),
        (encode({"id": 1, "event_ts": 0, "duration_ms": "1500"}), "duration_ms"),
        (encode({"id": 1, "event_ts": 0, "device": 5}), "device"),
        (encode({"id": 1, "event_ts": 0, "event_type": "skip"}), "event_type 'skip' is not one of"),
        (encode({"id": 1, "event_ts": 0, "event_type": 3}), "event_type 3 is not one of"),
        (encode({"id": 1, "event_ts": 0, "raw_payload": "{not json"}), "raw_payload is not valid JSON"),
        (encode(envelope(event_row(raw_payload="{oops"))), "raw_payload is not valid JSON"),
        (encode(envelope(event_row(event_ts=None))), "missing event_ts"),
        (encode(envelope(event_row(event_id=None))), "missing id"),
        (encode(envelope(event_row(), op="x")), "unknown Debezium op 'x'"),
        (encode(envelope(None, op="c")), "without an 'after' row"),
        (encode(flattened(event_row(), op="x")), "unknown Debezium op 'x'"),
        (encode({"schema": {}, "payload": [1]}), "'payload' is not an object"),
    ],
)
def test_bad_input_is_a_decode_error_with_a_reason(value, reason_fragment):
    with pytest.raises(DecodeError, match=None) as raised:
        decode_record(value)
    assert reason_fragment in str(raised.value)


def test_decode_transform_routes_events_and_dead_letters_with_coordinates():
    source = SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=2, offset=41)
    records = [
        RawRecord(value=encode(envelope(event_row())), source=source),
        RawRecord(value=None, source=source.model_copy(update={"offset": 42})),
        RawRecord(value=b"\x00garbage", source=source.model_copy(update={"offset": 43})),
    ]
    with test_pipeline.TestPipeline() as pipeline:
        outputs = pipeline | beam.Create(records) | DecodeRecords()
        assert_that(
            outputs.events | "WithTimestamp" >> beam.ParDo(_EmitWithTimestamp()),
            equal_to([(1042, EXPECTED.event_ts.timestamp())]),
            label="Events",
        )
        assert_that(
            outputs[DEAD_LETTER_TAG]
            | beam.Map(lambda d: (d.stage, d.payload_bytes, d.payload_text, d.source.offset, d.reason[:8])),
            equal_to([(Stage.DECODE, b"\x00garbage", "\x00garbage", 43, "not JSON")]),
            label="DeadLetters",
        )


class _EmitWithTimestamp(beam.DoFn):
    def process(self, event, timestamp=beam.DoFn.TimestampParam):
        yield (event.id, float(timestamp))


# --- issue 16: records that used to stop the job -------------------------------------------------------------

VALID_PLAIN = {"id": 7, "event_ts": "2026-11-22T10:15:30Z"}


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize(
    ("value", "reason_fragment"),
    [
        (_nested(1000), "too deeply nested"),
        (b"[" * 100_000, "too deeply nested"),
        (bytes(range(256)), "not UTF-8"),
        (encode(with_schema(envelope(event_row())))[:-40], "not JSON"),
        (encode({**VALID_PLAIN, "device": "x" * 2_000_000}), "too large: 2000"),
        (encode({**VALID_PLAIN, "id": "7"}), "id"),
        (b'{"id":7,"event_ts":0,"device":"\xed\xa0\x80"}', "not UTF-8"),  # a UTF-8-encoded lone surrogate
        (b'{"id":7,"event_ts":0,"device":"\\ud800"}', "device: invalid text"),  # the same, as a JSON escape
        (encode({"id": 10**30, "event_ts": 0}), "outside the BIGSERIAL range"),
        (encode({"id": 0, "event_ts": 0}), "outside the BIGSERIAL range"),
        (encode({"id": 2**63, "event_ts": 0}), "outside the BIGSERIAL range"),
        (encode({"id": 1, "event_ts": -(10**20)}), "out of range"),
        (encode({"id": 1, "event_ts": "0001-01-01T00:00:00+01:00"}), "out of range in UTC"),
        (encode({"id": 1, "event_ts": 0, "duration_ms": 2**31}), "outside the INTEGER range"),
        (b'{"id":' + b"9" * 5000 + b',"event_ts":0}', "not JSON"),
        (b'{"id":1,"event_ts":0,"raw_payload":{"x":NaN}}', "NaN is not a JSON number"),
        (b'{"id":1,"event_ts":0,"raw_payload":{"x":1e999}}', "raw_payload cannot be stored as JSON"),
        (encode(envelope(event_row(raw_payload="[" * 100 + "]" * 100))), "raw_payload is not valid JSON: too deeply"),
        (b'[{"id":1,"event_ts":0}]', "unknown shape"),
        ('{"id":1,"event_ts":0}'.encode("utf-16"), "not UTF-8"),
    ],
    ids=[
        "nested-1000",
        "open-brackets",
        "random-bytes",
        "truncated-debezium",
        "2MB",
        "id-string",
        "invalid-utf8-in-json",
        "lone-surrogate-escape",
        "id-10e30",
        "id-0",
        "id-2e63",
        "event-ts-minus-10e20",
        "event-ts-before-year-1",
        "duration-over-int32",
        "5000-digit-number",
        "nan",
        "infinity",
        "deep-jsonb-string",
        "json-array",
        "utf-16",
    ],
)
def test_poison_records_are_decode_errors(value, reason_fragment):
    with pytest.raises(DecodeError) as raised:
        decode_record(value)
    assert reason_fragment in str(raised.value)


def test_largest_valid_values_still_decode():
    event = decode_record(
        encode({"id": 2**63 - 1, "event_ts": "9999-12-31T23:59:59.999999Z", "duration_ms": 2**31 - 1})
    )
    assert event.event is not None
    assert event.event.id == 2**63 - 1
    assert event.event.event_ts == datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def test_tombstones_null_keys_and_other_tables_are_skips_not_dead_letters():
    other_table = envelope(event_row())
    other_table["source"] = {"table": "content"}
    assert decode_record(None).skip is SkipReason.TOMBSTONE
    assert decode_record(encode(other_table)).skip is SkipReason.OTHER_TABLE


def test_size_limit_is_inclusive_and_configurable():
    value = encode(VALID_PLAIN)
    assert decode_record(value, DecodeLimits(max_record_bytes=len(value))).event is not None
    with pytest.raises(DecodeError, match=f"too large: {len(value)} bytes, over the limit of {len(value) - 1}"):
        decode_record(value, DecodeLimits(max_record_bytes=len(value) - 1))


def test_depth_limit_counts_structure_not_brackets_inside_strings():
    limits = DecodeLimits(max_depth=10)
    nested_payload = {"a": {"b": {"c": [[[[[[1]]]]]]}}}  # depth 9, inside the event object: 10 in all
    assert decode_record(encode({**VALID_PLAIN, "raw_payload": nested_payload}), limits).event is not None
    with pytest.raises(DecodeError, match="more than 10 levels"):
        decode_record(encode({**VALID_PLAIN, "raw_payload": {"x": nested_payload}}), limits)
    brackets_in_text = {**VALID_PLAIN, "device": '[[[[[[[[[[[[{{{{{{{\\"' * 10}
    assert decode_record(encode(brackets_in_text), limits).event.device == brackets_in_text["device"]


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("[]", 1),
        ('{"a":[{"b":[]}]}', 4),
        ('["]]]]", ["[[["]]', 2),
        ('["\\\\", [["\\"]"]]]', 3),  # an escaped backslash ends a string; an escaped quote does not
        ('[[["unterminated [[[[[[', 3),
    ],
)
def test_json_depth_exceeds_matches_the_real_depth(text, depth):
    assert json_depth_exceeds(text, depth - 1)
    assert not json_depth_exceeds(text, depth)


def test_decode_limits_refuse_depths_python_could_not_parse():
    with pytest.raises(ValueError, match="between 5 and 500"):
        DecodeLimits(max_depth=900)
    with pytest.raises(ValueError, match="positive"):
        DecodeLimits(max_record_bytes=0)


def test_too_large_record_is_dead_lettered_with_an_excerpt_and_its_size():
    source = SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=0, offset=9)
    huge = encode({**VALID_PLAIN, "device": "x" * 200_000})
    with test_pipeline.TestPipeline() as pipeline:
        outputs = (
            pipeline
            | beam.Create([RawRecord(value=huge, source=source)])
            | DecodeRecords(DecodeLimits(max_record_bytes=100_000))
        )
        assert_that(
            outputs[DEAD_LETTER_TAG]
            | beam.Map(lambda d: (d.reason.split(" (")[0], len(d.payload_bytes), d.payload_bytes == huge[:65_536])),
            equal_to([(f"too large: {len(huge)} bytes, over the limit of 100000 bytes", 65_536, True)]),
        )


def test_an_unexpected_decoder_error_is_a_dead_letter_not_a_failed_bundle(monkeypatch):
    def broken(value, limits):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr("transforms.decode.decode_record", broken)
    source = SourceCoordinates(kind="kafka", topic="t", partition=1, offset=5)
    with test_pipeline.TestPipeline() as pipeline:
        outputs = pipeline | beam.Create([RawRecord(value=b"{}", source=source)]) | DecodeRecords()
        assert_that(
            outputs[DEAD_LETTER_TAG] | beam.Map(lambda d: (d.stage, d.reason, d.payload_bytes, d.source.offset)),
            equal_to([(Stage.DECODE, "RecursionError: maximum recursion depth exceeded", b"{}", 5)]),
        )


@pytest.mark.parametrize("committed", [None, "1795342530125", True, -1, 2**60, 1.5])
def test_a_missing_or_odd_commit_time_only_goes_unmeasured(committed):
    document = envelope(event_row())
    document["source"]["ts_ms"] = committed
    event = decode_record(encode(document)).event
    assert event is not None
    assert event.committed_at_ms is None
    assert event.model_copy(update={"committed_at_ms": EXPECTED.committed_at_ms}) == EXPECTED


def test_a_plain_event_cannot_claim_a_commit_time():
    row = {"id": 7, "event_ts": "2026-11-22T10:15:30Z", "committed_at_ms": 1}
    assert decode_record(encode(row)).event.committed_at_ms is None


# --- schema drift: a column renamed or dropped in PostgreSQL -------------------------------------------------


def _renamed(row: dict, old: str, new: str) -> dict:
    return {(new if name == old else name): value for name, value in row.items()}


@pytest.mark.parametrize("shape", [envelope, flattened, lambda row: with_schema(envelope(row))])
def test_a_missing_nullable_column_keeps_the_event_with_null_and_names_the_column(shape):
    decoded = decode_record(encode(shape(_renamed(event_row(), "device", "device_name"))))
    assert decoded.missing_columns == ("device",)
    assert decoded.event == EXPECTED.model_copy(update={"device": None})


def test_new_columns_are_ignored_and_a_full_row_reports_no_drift():
    row = {**event_row(), "app_version": "1.2.3"}
    decoded = decode_record(encode(envelope(row)))
    assert decoded.missing_columns == ()
    assert decoded.event == EXPECTED


@pytest.mark.parametrize("column", ["id", "event_ts"])
def test_a_missing_required_column_is_a_dead_letter_that_says_so(column):
    with pytest.raises(DecodeError, match=rf"^missing column {column}: .*renamed or dropped.*{column}_renamed"):
        decode_record(encode(envelope(_renamed(event_row(), column, f"{column}_renamed"))))


def test_plain_events_may_leave_out_nullable_fields_without_counting_as_drift():
    decoded = decode_record(encode({"id": 7, "event_ts": "2026-11-22T10:15:30Z"}))
    assert decoded.missing_columns == ()
    assert decoded.event.device is None


def test_the_decoder_counts_each_missing_column_and_logs_it_once(caplog):
    renamed = [encode(envelope({**_renamed(event_row(), "device", "device_name"), "id": i})) for i in range(1, 6)]
    whole = encode(envelope({**event_row(), "id": 6}))
    source = SourceCoordinates(kind="kafka", topic="t", partition=0, offset=0)
    pipeline = test_pipeline.TestPipeline()
    outputs = pipeline | beam.Create([RawRecord(value=v, source=source) for v in [*renamed, whole]]) | DecodeRecords()
    assert_that(
        outputs.events | beam.Map(lambda e: (e.id, e.device)), equal_to([*((i, None) for i in range(1, 6)), (6, "ios")])
    )
    with caplog.at_level("WARNING", logger="transforms.decode"):
        result = pipeline.run()
        result.wait_until_finish()
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query(MetricsFilter().with_namespace("decode"))["counters"]
    }
    assert counters["schema_drift_missing_device"] == 5
    assert "schema_drift_missing_user_id" not in counters or counters["schema_drift_missing_user_id"] == 0
    no_longer = [r for r in caplog.records if "no longer carry column 'device'" in r.getMessage()]
    assert len(no_longer) == 1


def test_a_column_counts_as_back_only_after_records_stop_lacking_it(monkeypatch, caplog):
    """Records from before and after a rename interleave: a record with the column amid records without it
    must not announce the column back (the live view would say so while it is still missing)."""
    now = [1000.0]
    monkeypatch.setattr("transforms.decode.time.monotonic", lambda: now[0])
    source = SourceCoordinates(kind="kafka", topic="t", partition=0, offset=0)
    without = RawRecord(value=encode(envelope(_renamed(event_row(), "device", "device_name"))), source=source)
    with_device = RawRecord(value=encode(envelope(event_row())), source=source)
    decoder = DecodeRecordsFn()

    def feed(record: RawRecord, at: float) -> None:
        now[0] = at
        list(decoder.process(record))

    with caplog.at_level("WARNING", logger="transforms.decode"):
        feed(without, 1000.0)
        feed(with_device, 1001.0)  # an older record from another partition
        feed(without, 1002.0)
        feed(with_device, 1005.0)
        assert [record.getMessage() for record in caplog.records] == [
            "schema drift: change records of engagement_events no longer carry column 'device' (renamed or "
            "dropped?); their events flow on with device NULL, counted in decode/schema_drift_missing_device"
        ]
        feed(with_device, 1012.5)  # ten seconds without a record lacking it
    assert caplog.records[-1].getMessage().endswith("carry column 'device' again")
    assert len(caplog.records) == 2
