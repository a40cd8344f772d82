"""Turn raw Kafka (or PostgreSQL) records into validated events, per SPEC §2.

Every input is classified by one pure function, ``decode_record``, into exactly one of:
an event, a counted skip (updates, deletes, tombstones, other tables) or a dead letter with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from pydantic import ValidationError

from transforms.model import (
    EVENT_TYPES,
    DeadLetter,
    EngagementEvent,
    RawRecord,
    Stage,
    canonical_json,
)

EVENTS_TABLE = "engagement_events"
DEAD_LETTER_TAG = "dead_letter"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COUNTED_OPS = frozenset({"c", "r"})  # insert and snapshot read are engagement events
_SKIPPED_OPS = frozenset({"u", "d", "t", "m"})  # update, delete, truncate, logical message


class Shape(StrEnum):
    """The input shapes of SPEC §2, named as they appear in metrics."""

    DEBEZIUM_WITH_SCHEMA = "debezium_with_schema"
    DEBEZIUM_ENVELOPE = "debezium_envelope"
    DEBEZIUM_FLATTENED = "debezium_flattened"
    PLAIN_JSON = "plain_json"


class SkipReason(StrEnum):
    TOMBSTONE = "tombstone"
    UPDATE = "op_u"
    DELETE = "op_d"
    TRUNCATE = "op_t"
    MESSAGE = "op_m"
    OTHER_TABLE = "other_table"


_SKIP_FOR_OP = {
    "u": SkipReason.UPDATE,
    "d": SkipReason.DELETE,
    "t": SkipReason.TRUNCATE,
    "m": SkipReason.MESSAGE,
}


class DecodeError(ValueError):
    """The record cannot become an event; the message is the dead-letter reason."""


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one record: exactly one of ``event`` and ``skip`` is set."""

    shape: Shape | None
    event: EngagementEvent | None = None
    skip: SkipReason | None = None


def decode_record(value: bytes | None) -> Decoded:
    """Classify one record value. Raises ``DecodeError`` for anything that belongs in the dead letter."""
    if value is None or value == b"":
        return Decoded(shape=None, skip=SkipReason.TOMBSTONE)
    try:
        document = json.loads(value)
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(document, dict):
        raise DecodeError(f"unknown shape: a JSON {type(document).__name__}, not an object")

    if "schema" in document and "payload" in document:
        payload = document["payload"]
        if payload is None:  # a schema-wrapped tombstone
            return Decoded(shape=Shape.DEBEZIUM_WITH_SCHEMA, skip=SkipReason.TOMBSTONE)
        if not isinstance(payload, dict):
            raise DecodeError("unknown shape: 'payload' is not an object")
        inner = _decode_debezium(payload)
        return Decoded(shape=Shape.DEBEZIUM_WITH_SCHEMA, event=inner.event, skip=inner.skip)
    return _decode_debezium(document)


def _decode_debezium(document: dict[str, Any]) -> Decoded:
    if "op" in document and ("after" in document or "before" in document):
        return _decode_envelope(document)
    if "__op" in document or "__deleted" in document:
        return _decode_flattened(document)
    return Decoded(shape=Shape.PLAIN_JSON, event=_validate_plain_event(document))


def _decode_envelope(envelope: dict[str, Any]) -> Decoded:
    shape = Shape.DEBEZIUM_ENVELOPE
    source = envelope.get("source")
    table = source.get("table") if isinstance(source, dict) else None
    if table is not None and table != EVENTS_TABLE:
        return Decoded(shape=shape, skip=SkipReason.OTHER_TABLE)
    op = envelope.get("op")
    if op in _SKIPPED_OPS:
        return Decoded(shape=shape, skip=_SKIP_FOR_OP[op])
    if op not in _COUNTED_OPS:
        raise DecodeError(f"unknown Debezium op {op!r}")
    after = envelope.get("after")
    if not isinstance(after, dict):
        raise DecodeError(f"Debezium op {op!r} without an 'after' row")
    return Decoded(shape=shape, event=_validate_cdc_row(after))


def _decode_flattened(row: dict[str, Any]) -> Decoded:
    shape = Shape.DEBEZIUM_FLATTENED
    table = row.get("__table")
    if table is not None and table != EVENTS_TABLE:
        return Decoded(shape=shape, skip=SkipReason.OTHER_TABLE)
    # ExtractNewRecordState's delete.handling.mode=rewrite marks deletes with __deleted="true".
    if str(row.get("__deleted", "false")).lower() == "true":
        return Decoded(shape=shape, skip=SkipReason.DELETE)
    op = row.get("__op", "c")
    if op in _SKIPPED_OPS:
        return Decoded(shape=shape, skip=_SKIP_FOR_OP[op])
    if op not in _COUNTED_OPS:
        raise DecodeError(f"unknown Debezium op {op!r}")
    fields = {name: value for name, value in row.items() if not name.startswith("__")}
    return Decoded(shape=shape, event=_validate_cdc_row(fields))


def _validate_cdc_row(row: Mapping[str, Any]) -> EngagementEvent:
    """A row as Debezium serialises it: ISO-8601 timestamps, UUID strings, JSONB as a JSON string."""
    raw_payload = row.get("raw_payload")
    if raw_payload is not None:
        if not isinstance(raw_payload, str):
            raise DecodeError("raw_payload: Debezium sends JSONB as a string")
        raw_payload = _canonical_json_text(raw_payload)
    return _validate(row, event_ts=_parse_event_ts(row.get("event_ts")), raw_payload=raw_payload)


def _validate_plain_event(row: Mapping[str, Any]) -> EngagementEvent:
    """An application's event: column names as keys, ``event_ts`` ISO-8601 or epoch milliseconds."""
    if "id" not in row:
        raise DecodeError("unknown shape: an object without 'id' is neither a Debezium record nor an event")
    event_type = row.get("event_type")
    if event_type is not None and event_type not in EVENT_TYPES:
        raise DecodeError(f"event_type {event_type!r} is not one of {', '.join(EVENT_TYPES)}")
    raw_payload = row.get("raw_payload")
    if isinstance(raw_payload, str):
        raw_payload = _canonical_json_text(raw_payload)
    elif raw_payload is not None:
        raw_payload = canonical_json(raw_payload)
    return _validate(row, event_ts=_parse_event_ts(row.get("event_ts")), raw_payload=raw_payload)


def _validate(row: Mapping[str, Any], event_ts: datetime, raw_payload: str | None) -> EngagementEvent:
    if row.get("id") is None:
        raise DecodeError("missing id")
    try:
        return EngagementEvent.model_validate({**row, "event_ts": event_ts, "raw_payload": raw_payload})
    except ValidationError as exc:
        raise DecodeError(_describe_validation_error(exc)) from exc


def _parse_event_ts(value: Any) -> datetime:
    if value is None:
        raise DecodeError("missing event_ts")
    if isinstance(value, bool):
        raise DecodeError("event_ts: a boolean is not a timestamp")
    if isinstance(value, int):
        try:
            # Integer arithmetic keeps every millisecond exact, which float division would not.
            return _EPOCH + timedelta(milliseconds=value)
        except OverflowError as exc:
            raise DecodeError(f"event_ts: epoch milliseconds {value} out of range") from exc
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError(f"event_ts: {value!r} is not ISO-8601") from exc
        if parsed.tzinfo is None:
            raise DecodeError(f"event_ts: {value!r} has no UTC offset; refusing to guess its time zone")
        return parsed.astimezone(UTC)
    raise DecodeError(f"event_ts: a {type(value).__name__} is neither ISO-8601 nor epoch milliseconds")


def _canonical_json_text(text: str) -> str:
    try:
        return canonical_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise DecodeError(f"raw_payload is not valid JSON: {exc.msg}") from exc


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error["loc"]) or "record"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


class DecodeRecordsFn(beam.DoFn):
    """Emits events (timestamped with ``event_ts``) on the main output and dead letters on a tag."""

    def __init__(self) -> None:
        self._parsed = Metrics.counter("decode", "events_parsed")
        self._dead_lettered = Metrics.counter("decode", "dead_lettered")
        self._skipped = {reason: Metrics.counter("decode", f"skipped_{reason.value}") for reason in SkipReason}
        self._shapes = {shape: Metrics.counter("decode", f"shape_{shape.value}") for shape in Shape}

    def process(self, record: RawRecord) -> Iterator[Any]:
        try:
            decoded = decode_record(record.value)
        except DecodeError as exc:
            self._dead_lettered.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG, DeadLetter.of(Stage.DECODE, str(exc), record.value, record.source)
            )
            return
        if decoded.shape is not None:
            self._shapes[decoded.shape].inc()
        if decoded.skip is not None:
            self._skipped[decoded.skip].inc()
            return
        event = decoded.event
        assert event is not None  # decode_record sets exactly one of event and skip
        self._parsed.inc()
        yield TimestampedValue(event, Timestamp.from_utc_datetime(event.event_ts))


class DecodeRecords(beam.PTransform):
    """RawRecord -> EngagementEvent (timestamped by event time), plus dead letters under ``dead_letter``."""

    def expand(self, records: beam.PCollection[RawRecord]) -> beam.pvalue.DoOutputsTuple:
        return records | "ClassifyAndValidate" >> beam.ParDo(DecodeRecordsFn()).with_outputs(
            DEAD_LETTER_TAG, main="events"
        )
