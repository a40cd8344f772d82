"""Property-based tests (hypothesis) of the issue-16 rule: whatever arrives, each step either converts it or
dead-letters it, and never raises anything else; and whatever decode lets through converts downstream.

Examples are kept few (deadline off; the whole file runs in well under a minute): the point is variety of
shape (arbitrary bytes, deep and wide JSON, wrong types, huge numbers, lone surrogates), not volume.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from unittest.mock import patch
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.debezium import envelope, flattened, with_schema
from transforms.dead_letters import reject
from transforms.decode import Decoded, DecodeError, _load_json, _load_json_fast, decode_record
from transforms.enrich import enrich
from transforms.model import Content, EngagementEvent, RawRecord, SourceCoordinates, Stage, canonical_json, holds_float
from transforms.rows import dead_letter_row, enriched_event_row
from transforms.sinks.bigquery import TABLES_DDL, parse_table_columns
from transforms.sinks.bigquery_proto import encode_row, proto_message_class
from transforms.sinks.bigquery_tables import TableSpec
from transforms.sinks.http_wire import encode_event

PROPERTIES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KAFKA = SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=0, offset=1)
_COLUMNS = parse_table_columns(TABLES_DDL.read_text())
EVENTS_SPEC = TableSpec("p", "d", "enriched_events", _COLUMNS["enriched_events"])
LETTERS_SPEC = TableSpec("p", "d", "dead_letters", _COLUMNS["dead_letters"])
EVENTS_PROTO = proto_message_class(EVENTS_SPEC)
LETTERS_PROTO = proto_message_class(LETTERS_SPEC)

# --- strategies -----------------------------------------------------------------------------------------------

# Text with everything JSON can carry, lone surrogates included (json.dumps writes them as \udxxx escapes).
any_text = st.text(st.characters(codec=None, categories=None), max_size=20) | st.sampled_from(
    ["\ud800", "a\udfffb", "", "play", "c", "engagement_events", "content"]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: far past int64
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), 2**31, 10**30, -(10**20), 0, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(any_text, inner, max_size=5),
    max_leaves=20,
)
timestamps = (
    st.datetimes(timezones=st.just(UTC)).map(lambda moment: moment.isoformat())
    | st.sampled_from(["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-11-22T10:00:00", "x"])
    | st.integers()
)
uuids = st.uuids().map(str) | any_text
column_values = {
    "id": st.integers() | json_values,
    "content_id": st.none() | uuids,
    "user_id": st.none() | uuids,
    "event_type": st.none() | st.sampled_from(["play", "pause", "finish", "click", "skip"]) | json_values,
    "event_ts": st.none() | timestamps | json_values,
    "duration_ms": st.none() | st.integers() | json_values,
    "device": st.none() | any_text | json_values,
    "raw_payload": st.none() | json_values | json_values.map(lambda v: json.dumps(v)) | any_text,
}
rows = st.fixed_dictionaries({}, optional=column_values)
ops = st.sampled_from(["c", "r", "u", "d", "t", "m", "x"])
records = st.one_of(
    rows,
    st.builds(lambda row, op: envelope(row, op=op), rows, ops),
    st.builds(lambda row, op: with_schema(envelope(row, op=op)), rows, ops),
    st.builds(lambda row, op: flattened(row, op=op), rows, ops),
    json_values,
)


def _nested(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * depth + "1" + closer * depth


deep_documents = st.builds(_nested, st.integers(0, 3_000), st.sampled_from(["[", '{"a":'])).map(str.encode)
wide_documents = st.integers(0, 50_000).map(lambda n: json.dumps({"id": 1, "event_ts": 0, "raw_payload": [0] * n}))


def as_bytes(document: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as escapes, as a producer's JSON library would write them.
    return json.dumps(document, allow_nan=True).encode()


# --- properties -----------------------------------------------------------------------------------------------


def classify(value: bytes | None) -> Decoded | DecodeError:
    """decode_record's outcome; any exception other than DecodeError fails the test."""
    try:
        decoded = decode_record(value)
    except DecodeError as error:
        return error
    assert (decoded.event is None) != (decoded.skip is None), "exactly one of event and skip"
    return decoded


def check_downstream(outcome: Decoded | DecodeError, value: bytes | None) -> None:
    """A dead letter can be written to its table; an event converts at every later step without raising."""
    if isinstance(outcome, DecodeError):
        letter = reject(Stage.DECODE, RawRecord(value=value, source=KAFKA), outcome)
        encode_row(LETTERS_PROTO, LETTERS_SPEC, dead_letter_row(letter))
        return
    if outcome.event is None:
        return
    for content in (None, Content(id=UUID(int=1), slug="s", title="t", length_seconds=1)):
        enriched = enrich(outcome.event, content)
        encode_row(EVENTS_PROTO, EVENTS_SPEC, enriched_event_row(enriched, datetime.now(UTC)))
        encode_event(enriched)


@PROPERTIES
@given(st.binary(max_size=2_000))
def test_arbitrary_bytes_decode_to_exactly_one_outcome(value):
    check_downstream(classify(value), value)


@PROPERTIES
@given(records)
def test_arbitrary_json_records_decode_to_exactly_one_outcome(document):
    value = as_bytes(document)
    check_downstream(classify(value), value)


def _same_outcome(first: Decoded | DecodeError, second: Decoded | DecodeError) -> bool:
    if isinstance(first, DecodeError) or isinstance(second, DecodeError):
        return type(first) is type(second) and str(first) == str(second)
    return first == second


@PROPERTIES
@given(json_values)
def test_the_fast_json_reader_reads_what_the_standard_library_reads(value):
    text = as_bytes(value).decode()
    try:
        fast, exact = _load_json_fast(text, 500, "the value")
    except DecodeError:
        with pytest.raises(DecodeError):
            _load_json(text, 500, "the value")
        return
    if exact or not holds_float(fast):
        # repr: the same types and the same float digits, -0.0 included
        assert repr(fast) == repr(_load_json(text, 500, "the value"))


def _standard_library_canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@PROPERTIES
@given(json_values)
def test_canonical_json_writes_what_the_standard_library_writes(value):
    try:
        expected = _standard_library_canonical(value)
    except (ValueError, TypeError, RecursionError) as error:
        with pytest.raises(type(error)):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


def _exact_reading_only(text: str, max_depth: int, what: str) -> tuple[object, bool]:
    return _load_json(text, max_depth, what), True


@PROPERTIES
@given(records)
def test_records_decode_the_same_with_or_without_the_fast_json_reader(document):
    value = as_bytes(document)
    with_fast_reader = classify(value)
    with patch("transforms.decode._load_json_fast", _exact_reading_only):
        standard_library_only = classify(value)
    assert _same_outcome(with_fast_reader, standard_library_only)


def test_integers_beyond_64_bits_keep_their_digits_and_their_reasons():
    plain = {"id": 1, "event_ts": 0, "raw_payload": {"n": 10**30, "m": -(2**63) - 1}}
    decoded = decode_record(json.dumps(plain).encode())
    assert decoded.event.raw_payload == '{"m":-9223372036854775809,"n":1000000000000000000000000000000}'
    cdc = {"op": "c", "after": {"id": 2**64, "event_ts": "2026-11-22T10:00:00Z"}}
    outcome = classify(json.dumps(cdc).encode())
    assert isinstance(outcome, DecodeError)
    assert "18446744073709551616 is outside the BIGSERIAL range" in str(outcome)


@settings(max_examples=40, deadline=None)
@given(deep_documents | wide_documents.map(str.encode))
def test_deep_and_wide_documents_decode_without_recursion_errors(value):
    outcome = classify(value)
    check_downstream(outcome, value)
    if value.count(b"[") + value.count(b"{") > 64 and value.startswith((b"[[", b'{"a":{')):
        assert isinstance(outcome, DecodeError)
        assert "too deeply nested" in str(outcome)


int32 = st.integers(-(2**31), 2**31 - 1)
valid_events = st.builds(
    EngagementEvent,
    id=st.integers(1, 2**63 - 1),
    content_id=st.none() | st.uuids(),
    user_id=st.none() | st.uuids(),
    event_type=st.none() | st.sampled_from(["play", "pause", "finish", "click"]),
    event_ts=st.datetimes(timezones=st.just(UTC)),
    duration_ms=st.none() | int32,
    device=st.none() | st.text(max_size=20),
    raw_payload=st.none() | st.just('{"a":1}'),
)
contents = st.none() | st.builds(
    Content,
    id=st.uuids(),
    slug=st.text(max_size=10),
    title=st.text(max_size=10),
    content_type=st.none() | st.sampled_from(["podcast", "newsletter", "video"]),
    length_seconds=st.none() | int32,
)


@PROPERTIES
@given(valid_events, contents)
def test_enrich_and_every_row_convert_any_event_within_the_contract(event, content):
    enriched = enrich(event, content)
    row = enriched_event_row(enriched, datetime.now(UTC))
    decoded = EVENTS_PROTO.FromString(encode_row(EVENTS_PROTO, EVENTS_SPEC, row))
    assert decoded.event_id == event.id
    assert json.loads(encode_event(enriched))["id"] == event.id


@PROPERTIES
@given(
    st.builds(
        EngagementEvent,
        id=st.integers(),
        event_ts=st.datetimes(timezones=st.just(UTC)),
        duration_ms=st.none() | st.integers(),
        device=st.none() | any_text,
    ),
    contents,
)
def test_events_outside_the_contract_convert_or_leave_a_writable_dead_letter(event, content):
    # Built without decode, as a bug upstream could: the guarded steps' dead letters must still be writable.
    for stage, convert in (
        (Stage.ENRICH, lambda e: enrich(e, content)),
        (
            Stage.BIGQUERY,
            lambda e: encode_row(EVENTS_PROTO, EVENTS_SPEC, enriched_event_row(enrich(e, None), datetime.now(UTC))),
        ),
        (Stage.HTTP, lambda e: encode_event(enrich(e, None))),
    ):
        try:
            convert(event)
        except Exception as error:  # noqa: BLE001 - exactly what the guard catches
            letter = reject(stage, event, error)
            assert letter.event_id == (event.id if -(2**63) <= event.id < 2**63 else None)
            encode_row(LETTERS_PROTO, LETTERS_SPEC, dead_letter_row(letter))
