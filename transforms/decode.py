"""Turn raw Kafka (or PostgreSQL) records into validated events, per SPEC §2.

Every input is classified by one pure function, ``decode_record``, into exactly one of:
an event, a counted skip (updates, deletes, tombstones, other tables) or a dead letter with its reason.
Whatever the bytes, ``decode_record`` raises nothing but ``DecodeError`` (SPEC §3: a record that cannot be
read, for any reason, is a dead letter): records over a size limit, nested deeper than a depth limit,
with numbers or timestamps outside what the columns hold, or with text that is not valid Unicode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import accumulate
from typing import Any
from uuid import UUID

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from pydantic import ValidationError

from transforms.dead_letters import DEAD_LETTER_TAG, PAYLOAD_EXCERPT_BYTES, RejectedInputError, reject
from transforms.instants import beam_timestamp
from transforms.lists import per_item
from transforms.model import (
    EVENT_TYPES,
    EngagementEvent,
    RawRecord,
    Stage,
    canonical_json,
    holds_float,
)
from transforms.settings import setting

_log = logging.getLogger(__name__)

__all__ = ["DEAD_LETTER_TAG", "DecodeError", "DecodeLimits", "DecodeRecords", "Shape", "SkipReason", "decode_record"]

EVENTS_TABLE = "engagement_events"
NULLABLE_COLUMNS = ("content_id", "user_id", "event_type", "duration_ms", "device", "raw_payload")
"""The SPEC §1 columns a row may hold NULL in. A change record without one of them (a column renamed or
dropped in PostgreSQL) still becomes an event, with NULL there, counted as schema drift."""
REQUIRED_COLUMNS = ("id", "event_ts")
SCHEMA_DRIFT_LOG_SECONDS = 60.0
SCHEMA_DRIFT_SETTLE_SECONDS = 10.0

DEFAULT_MAX_RECORD_BYTES = 1_000_000
"""SPEC §3's "1 MB", in SI bytes (Kafka's own default limit is 1 MiB plus 12 bytes, slightly more)."""
DEFAULT_MAX_DEPTH = 64
"""Nesting of arrays and objects. Debezium's schema-wrapped envelope needs 5; the rest is for raw_payload."""
_DEPTH_CEILING = 500
"""json.loads recurses once per level; Python's default recursion limit (1,000) must never be the one hit."""

# Column ranges (SPEC §1): id is a BIGSERIAL, duration_ms an INTEGER. Timestamps are bounded by datetime
# itself (years 1 to 9999), which is also BigQuery's TIMESTAMP range.
_ID_RANGE = (1, 2**63 - 1)
_INTEGER_RANGE = (-(2**31), 2**31 - 1)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_COUNTED_OPS = frozenset({"c", "r"})  # insert and snapshot read are engagement events
_SKIPPED_OPS = frozenset({"u", "d", "t", "m"})  # update, delete, truncate, logical message


class Shape(StrEnum):
    """The input shapes of SPEC §2, named as they appear in metrics."""

    DEBEZIUM_WITH_SCHEMA = "debezium_with_schema"
    DEBEZIUM_ENVELOPE = "debezium_envelope"
    DEBEZIUM_FLATTENED = "debezium_flattened"
    PLAIN_JSON = "plain_json"
    TABLE_ROW = "table_row"
    """An ``engagement_events`` row the backfill read with its column types (``event_from_table_row``)."""


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


class DecodeError(RejectedInputError):
    """The record cannot become an event; the message is the dead-letter reason."""


@dataclass(frozen=True)
class DecodeLimits:
    """What the decoder refuses to read, whatever the content (SPEC §3, "too large, too deeply nested")."""

    max_record_bytes: int = setting(
        DEFAULT_MAX_RECORD_BYTES,
        flag="--max_record_bytes",
        type=int,
        help=(
            "Largest record value decoded, in bytes (SPEC's 1 MB, as 1,000,000). A larger record is a dead "
            "letter whose reason gives its size and whose payload keeps only its first 64 KiB."
        ),
    )
    max_depth: int = DEFAULT_MAX_DEPTH

    def __post_init__(self) -> None:
        if self.max_record_bytes < 1:
            raise ValueError(f"the maximum record size must be positive, not {self.max_record_bytes}")
        if not 5 <= self.max_depth <= _DEPTH_CEILING:
            raise ValueError(f"the maximum nesting depth must be between 5 and {_DEPTH_CEILING}, not {self.max_depth}")


_DEFAULT_LIMITS = DecodeLimits()
# A JSON string (complete), a bracket, or a quote that opens a string never closed.
_DEPTH_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|"', re.DOTALL)
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth_exceeds(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests arrays and objects deeper than ``max_depth``, checked before parsing.

    The common case costs two C-level counts: a document with no more opening brackets than the limit
    cannot nest deeper. Only beyond that are brackets inside strings told apart from structure.
    """
    if text.count("{") + text.count("[") <= max_depth:
        return False
    brackets = []
    for match in _DEPTH_TOKENS.finditer(text):
        lexeme = match.group()
        if lexeme == '"':
            break  # an unterminated string: the parser fails there, having gone no deeper than this
        if lexeme[0] != '"':
            brackets.append(lexeme)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > max_depth


def _reject_constant(name: str) -> Any:
    raise DecodeError(f"not JSON: {name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # built once: json.loads(**kw) builds one per call


def _check_depth(text: str, max_depth: int, what: str) -> None:
    if json_depth_exceeds(text, max_depth):
        raise DecodeError(f"too deeply nested: {what} nests arrays/objects more than {max_depth} levels deep")


def _parse_exact(text: str) -> Any:
    """``json.loads`` that raises only DecodeError and refuses NaN/Infinity (JSONB and BigQuery JSON cannot hold
    them). For text whose depth is checked already (``_check_depth``)."""
    try:
        return _DECODER.decode(text)
    except DecodeError:
        raise
    except json.JSONDecodeError as exc:
        raise DecodeError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4,300 digits
        raise DecodeError(f"not JSON: {exc}") from exc


def _load_json(text: str, max_depth: int, what: str) -> Any:
    """``text`` read exactly as the standard library reads every number, depth checked first: the reading that
    ``_load_json_fast`` matches, and the reference its tests compare with."""
    _check_depth(text, max_depth, what)
    return _parse_exact(text)


def _load_json_fast(text: str, max_depth: int, what: str) -> tuple[Any, bool]:
    """(value, exact): ``text`` read by orjson, at a third of the standard library's cost, or by ``_parse_exact``
    where orjson refuses it; ``exact`` tells which. Depth is checked first either way.

    What orjson reads equals the standard library's reading (tests/unit/test_bad_input_properties.py compares
    them) except for one thing: an integer beyond 64 bits becomes a float. orjson refuses the rest that differs
    (NaN, Infinity, numbers beyond a double, lone surrogate escapes), and the standard library then reads it or
    refuses it with its own reason. So whoever takes an inexact value must not keep a float from it, and must
    treat a refusal of what it read as a reason to read the text again exactly (``decode_record``)."""
    _check_depth(text, max_depth, what)
    try:
        return orjson.loads(text), False
    except orjson.JSONDecodeError:
        return _parse_exact(text), True


class _InexactReadingError(DecodeError):
    """Raised on a document orjson read, where an integer it may have turned into a float would be kept."""


@dataclass(frozen=True)
class Decoded:
    """The outcome of decoding one record: exactly one of ``event`` and ``skip`` is set."""

    shape: Shape | None
    event: EngagementEvent | None = None
    skip: SkipReason | None = None
    missing_columns: tuple[str, ...] = ()
    """SPEC columns a change record's row lacks (schema drift); the event holds NULL in them."""


def decode_record(value: bytes | None, limits: DecodeLimits = _DEFAULT_LIMITS) -> Decoded:
    """Classify one record value. Raises ``DecodeError``, and nothing else, for what belongs in the dead letter."""
    if value is None or value == b"":
        return Decoded(shape=None, skip=SkipReason.TOMBSTONE)
    if len(value) > limits.max_record_bytes:
        raise DecodeError(
            f"too large: {len(value)} bytes, over the limit of {limits.max_record_bytes} bytes "
            f"(the dead letter keeps the first {PAYLOAD_EXCERPT_BYTES})"
        )
    try:
        # UTF-8 only (RFC 8259 §8.1), decoded strictly: json.loads would also guess UTF-16 and UTF-32.
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    text = text.removeprefix("\ufeff")
    document, exact = _load_json_fast(text, limits.max_depth, "the record")
    if not exact:
        try:
            return _decode_document(document, limits, exact=False)
        except DecodeError:
            # An integer orjson read as a float, or a record refused anyway: either way the reason (and, in the
            # first case, the outcome) is the one the standard library's reading gives.
            pass
        document = _parse_exact(text)  # its depth was checked by _load_json_fast
    return _decode_document(document, limits, exact=True)


def _decode_document(document: Any, limits: DecodeLimits, exact: bool) -> Decoded:
    """``exact``: ``document`` was read by the standard library (``_parse_exact``), not by orjson."""
    if not isinstance(document, dict):
        raise DecodeError(f"unknown shape: a JSON {type(document).__name__}, not an object")

    if "schema" in document and "payload" in document:
        payload = document["payload"]
        if payload is None:  # a schema-wrapped tombstone
            return Decoded(shape=Shape.DEBEZIUM_WITH_SCHEMA, skip=SkipReason.TOMBSTONE)
        if not isinstance(payload, dict):
            raise DecodeError("unknown shape: 'payload' is not an object")
        inner = _decode_debezium(payload, limits, exact)
        return dataclasses.replace(inner, shape=Shape.DEBEZIUM_WITH_SCHEMA)
    return _decode_debezium(document, limits, exact)


def _decode_debezium(document: dict[str, Any], limits: DecodeLimits, exact: bool) -> Decoded:
    if "op" in document and ("after" in document or "before" in document):
        return _decode_envelope(document, limits)
    if "__op" in document or "__deleted" in document:
        return _decode_flattened(document, limits)
    return Decoded(shape=Shape.PLAIN_JSON, event=_validate_plain_event(document, limits, exact))


def _decode_envelope(envelope: dict[str, Any], limits: DecodeLimits) -> Decoded:
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
    committed = source.get("ts_ms") if isinstance(source, dict) else None
    return Decoded(
        shape=shape,
        event=_validate_cdc_row(after, limits, _epoch_ms(committed)),
        missing_columns=missing_columns(after),
    )


def _decode_flattened(row: dict[str, Any], limits: DecodeLimits) -> Decoded:
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
    # ExtractNewRecordState adds the commit time as __source_ts_ms when configured with add.fields=source.ts_ms.
    return Decoded(
        shape=shape,
        event=_validate_cdc_row(fields, limits, _epoch_ms(row.get("__source_ts_ms"))),
        missing_columns=missing_columns(fields),
    )


def missing_columns(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The nullable SPEC columns absent from a change record's row, in table order.

    Debezium writes every column of the table into each row, NULL or not, so an absent column means the table
    changed (renamed or dropped), not a NULL. Columns the SPEC does not know are ignored."""
    return tuple(column for column in NULLABLE_COLUMNS if column not in row)


def _epoch_ms(value: Any) -> int | None:
    """A plausible epoch-millisecond commit time, or None: it only feeds metrics, so it never rejects a record."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**53:
        return value
    return None


def _validate_cdc_row(row: Mapping[str, Any], limits: DecodeLimits, committed_at_ms: int | None) -> EngagementEvent:
    """A row as Debezium serialises it: ISO-8601 timestamps, UUID strings, JSONB as a JSON string."""
    for column in REQUIRED_COLUMNS:
        if column not in row:
            raise DecodeError(
                f"missing column {column}: the change record's row has no {column!r} (was the column renamed "
                f"or dropped in PostgreSQL?); its columns: {', '.join(sorted(row)[:12]) or 'none'}"
            )
    raw_payload = row.get("raw_payload")
    if raw_payload is not None:
        if not isinstance(raw_payload, str):
            raise DecodeError("raw_payload: Debezium sends JSONB as a string")
        raw_payload = _canonical_json_text(raw_payload, limits.max_depth)
    return _validate(row, _parse_event_ts(row.get("event_ts")), raw_payload, committed_at_ms)


def _validate_plain_event(row: Mapping[str, Any], limits: DecodeLimits, exact: bool = True) -> EngagementEvent:
    """An application's event: column names as keys, ``event_ts`` ISO-8601 or epoch milliseconds."""
    if "id" not in row:
        raise DecodeError("unknown shape: an object without 'id' is neither a Debezium record nor an event")
    event_type = row.get("event_type")
    if event_type is not None and event_type not in EVENT_TYPES:
        raise DecodeError(f"event_type {event_type!r} is not one of {', '.join(EVENT_TYPES)}")
    raw_payload = row.get("raw_payload")
    if isinstance(raw_payload, str):
        raw_payload = _canonical_json_text(raw_payload, limits.max_depth)
    elif raw_payload is not None:
        if not exact and holds_float(raw_payload):
            raise _InexactReadingError("raw_payload holds a number orjson may have read inexactly")
        raw_payload = _canonical(raw_payload)
    return _validate(row, _parse_event_ts(row.get("event_ts")), raw_payload, committed_at_ms=None)


def _validate(
    row: Mapping[str, Any], event_ts: datetime, raw_payload: str | None, committed_at_ms: int | None
) -> EngagementEvent:
    if row.get("id") is None:
        raise DecodeError("missing id")
    try:
        event = EngagementEvent.model_validate(
            {**row, "event_ts": event_ts, "raw_payload": raw_payload, "committed_at_ms": committed_at_ms}
        )
    except ValidationError as exc:
        raise DecodeError(_describe_validation_error(exc)) from exc
    _check_range("id", event.id, _ID_RANGE, "BIGSERIAL")
    if event.duration_ms is not None:
        _check_range("duration_ms", event.duration_ms, _INTEGER_RANGE, "INTEGER")
    if event.device is not None:
        _check_unicode("device", event.device)
    return event


def _in_range(value: int, bounds: tuple[int, int]) -> bool:
    return bounds[0] <= value <= bounds[1]


def _check_range(name: str, value: int, bounds: tuple[int, int], column_type: str) -> None:
    if not _in_range(value, bounds):
        low, high = bounds
        shown = str(value) if len(str(value)) <= 40 else f"a {len(str(value))}-digit number"
        raise DecodeError(f"{name}: {shown} is outside the {column_type} range {low}..{high}")


def _check_unicode(name: str, text: str) -> None:
    # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 sink can write.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DecodeError(f"{name}: invalid text ({exc.reason} at character {exc.start})") from exc


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
            shown = str(value) if len(str(value)) <= 40 else f"a {len(str(value))}-digit number"
            raise DecodeError(
                f"event_ts: epoch milliseconds {shown} out of range (years 1 to 9999, as BigQuery's TIMESTAMP)"
            ) from exc
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError(f"event_ts: {value!r} is not ISO-8601") from exc
        if parsed.tzinfo is None:
            raise DecodeError(f"event_ts: {value!r} has no UTC offset; refusing to guess its time zone")
        try:
            return parsed.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
            raise DecodeError(f"event_ts: {value!r} is out of range in UTC (years 1 to 9999)") from exc
    raise DecodeError(f"event_ts: a {type(value).__name__} is neither ISO-8601 nor epoch milliseconds")


def _canonical_json_text(text: str, max_depth: int) -> str:
    try:
        value, exact = _load_json_fast(text, max_depth, "raw_payload")
        if not exact and holds_float(value):
            value = _parse_exact(text)  # each number exactly as the standard library reads it
        return _canonical(value)
    except DecodeError as exc:
        raise DecodeError(f"raw_payload is not valid JSON: {str(exc).removeprefix('not JSON: ')}") from exc


def _canonical(value: Any) -> str:
    try:
        text = canonical_json(value)
    except (ValueError, TypeError, RecursionError) as exc:  # NaN or infinity (1e999), too deep
        raise DecodeError(f"raw_payload cannot be stored as JSON: {exc}") from exc
    _check_unicode("raw_payload", text)
    return text


TABLE_ROW_COLUMNS = ("id", "content_id", "user_id", "event_type", "event_ts", "duration_ms", "device", "raw_payload")
"""The ``engagement_events`` columns ``event_from_table_row`` reads, in order; UUIDs and JSONB as text."""
# What the JSON document of a row (PostgreSQL's json_build_object over these columns) adds to its device and
# raw_payload, at most: keys, punctuation and the other columns' values take under 400 bytes.
_DOCUMENT_OVERHEAD_BYTES = 1_024
_MAX_ESCAPED_BYTES_PER_CHARACTER = 6  # a control character is written as \u00XX in the document


def event_from_table_row(row: Sequence[Any], limits: DecodeLimits = _DEFAULT_LIMITS) -> EngagementEvent | None:
    """The event of an ``engagement_events`` row read with its own column types (``TABLE_ROW_COLUMNS``), or None
    when only ``decode_record`` on the row's JSON document can say what the row becomes.

    The table's DDL already guarantees what validating the document checks for most rows (id and event_ts
    present, ids and durations in range, valid text), so building the event directly costs about half of
    decoding the document (docs/benchmarks.md). It must give exactly the event
    ``decode_record`` gives for that document (``tests/integration/test_postgres_source.py`` compares both
    on real rows), so every row it is not sure of returns None: an unknown event type (a table without the
    CHECK), a document that could exceed the size or depth limit, or a raw_payload that decoding would refuse
    or read in a way of its own.
    """
    event_id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload = row
    # The column types the DDL gives (a changed column goes through the document, which checks everything).
    if type(event_id) is not int or not isinstance(event_ts, datetime) or event_ts.tzinfo is None:
        return None
    if event_type is not None and event_type not in EVENT_TYPES:
        return None
    if duration_ms is not None and (type(duration_ms) is not int or not _in_range(duration_ms, _INTEGER_RANGE)):
        return None
    if not _in_range(event_id, _ID_RANGE) or (device is not None and type(device) is not str):
        return None
    # The document's size (the record size limit) is at most its overhead plus these, escaped.
    longest = (len(device) if device is not None else 0) + (len(raw_payload) if raw_payload is not None else 0)
    if _DOCUMENT_OVERHEAD_BYTES + _MAX_ESCAPED_BYTES_PER_CHARACTER * longest > limits.max_record_bytes:
        return None
    if raw_payload is not None:
        # Inside the document, raw_payload sits one level deeper than on its own.
        if json_depth_exceeds(raw_payload, limits.max_depth - 1):
            return None
        try:
            value = _DECODER.decode(raw_payload)
            # A JSONB string is read as JSON text again, and a JSONB null is no payload, as decoding the
            # document does (_validate_plain_event).
            if value is None:
                raw_payload = None
            elif isinstance(value, str):
                raw_payload = _canonical_json_text(value, limits.max_depth)
            else:
                raw_payload = _canonical(value)
        except (DecodeError, ValueError, RecursionError):
            return None
    return EngagementEvent.trusted(
        id=event_id,
        content_id=None if content_id is None else UUID(content_id),
        user_id=None if user_id is None else UUID(user_id),
        event_type=event_type,
        event_ts=event_ts.astimezone(UTC),
        duration_ms=duration_ms,
        device=device,
        raw_payload=raw_payload,
        committed_at_ms=None,
    )


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error["loc"]) or "record"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


class DecodeRecordsFn(beam.DoFn):
    """Emits events (timestamped with ``event_ts``) on the main output and dead letters on a tag."""

    def __init__(self, limits: DecodeLimits = _DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._parsed = Metrics.counter("decode", "events_parsed")
        self._dead_lettered = Metrics.counter("decode", "dead_lettered")
        self._skipped = {reason: Metrics.counter("decode", f"skipped_{reason.value}") for reason in SkipReason}
        self._shapes = {shape: Metrics.counter("decode", f"shape_{shape.value}") for shape in Shape}
        self._unexpected = Metrics.counter("decode", "unexpected_errors")
        self._drift = {
            column: Metrics.counter("decode", f"schema_drift_missing_{column}") for column in NULLABLE_COLUMNS
        }
        self._missing_now: set[str] = set()
        self._last_missing_at: dict[str, float] = {}
        self._last_drift_log: dict[tuple[str, bool], float] = {}

    def process(self, record: RawRecord | EngagementEvent) -> Iterator[Any]:
        if isinstance(record, EngagementEvent):  # built from a table row by event_from_table_row
            self._shapes[Shape.TABLE_ROW].inc()
            self._parsed.inc()
            yield TimestampedValue(record, beam_timestamp(record.event_ts))
            return
        try:
            decoded = decode_record(record.value, self._limits)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a decoder bug: either way not the job's end
            self._dead_lettered.inc()
            if not isinstance(exc, DecodeError):
                self._unexpected.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG, reject(Stage.DECODE, record, exc, payload_limit=self._limits.max_record_bytes)
            )
            return
        if decoded.shape is not None:
            self._shapes[decoded.shape].inc()
        if decoded.skip is not None:
            self._skipped[decoded.skip].inc()
            return
        event = decoded.event
        assert event is not None  # decode_record sets exactly one of event and skip
        if decoded.shape is not Shape.PLAIN_JSON and (decoded.missing_columns or self._missing_now):
            self._note_schema_drift(decoded.missing_columns)
        self._parsed.inc()
        yield TimestampedValue(event, beam_timestamp(event.event_ts))

    def _note_schema_drift(self, missing: tuple[str, ...]) -> None:
        """Counts each missing column; logs when a column goes missing and when it is back, not per event.

        Records from before and after a change interleave for a while (partitions, a backlog), so a column
        counts as back only once no record has lacked it for ``SCHEMA_DRIFT_SETTLE_SECONDS``, and each column
        logs at most one line a minute per direction."""
        clock = time.monotonic()
        for column in missing:
            self._drift[column].inc()
            self._last_missing_at[column] = clock
            if column not in self._missing_now:
                self._missing_now.add(column)
                self._log_drift(column, gone=True, clock=clock)
        for column in sorted(self._missing_now.difference(missing)):
            if clock - self._last_missing_at[column] >= SCHEMA_DRIFT_SETTLE_SECONDS:
                self._missing_now.discard(column)
                self._log_drift(column, gone=False, clock=clock)

    def _log_drift(self, column: str, gone: bool, clock: float) -> None:
        if clock - self._last_drift_log.get((column, gone), -SCHEMA_DRIFT_LOG_SECONDS) < SCHEMA_DRIFT_LOG_SECONDS:
            return
        self._last_drift_log[column, gone] = clock
        if gone:
            _log.warning(
                "schema drift: change records of %s no longer carry column %r (renamed or dropped?); their "
                "events flow on with %s NULL, counted in decode/schema_drift_missing_%s",
                EVENTS_TABLE,
                column,
                column,
                column,
            )
        else:
            _log.warning("schema drift: change records of %s carry column %r again", EVENTS_TABLE, column)


class DecodeRecords(beam.PTransform):
    """RawRecord -> EngagementEvent (timestamped by event time), plus dead letters under ``dead_letter``.

    Events a source already built from typed table rows (``event_from_table_row``) pass through, counted."""

    def __init__(self, limits: DecodeLimits = _DEFAULT_LIMITS, event_lists: bool = False) -> None:
        """``event_lists``: the input holds lists of records, and so does the output (``transforms/lists.py``)."""
        super().__init__()
        self._limits = limits
        self._event_lists = event_lists

    def expand(self, records: beam.PCollection[RawRecord]) -> beam.pvalue.DoOutputsTuple:
        decode = per_item(DecodeRecordsFn(self._limits), self._event_lists)
        return records | "ClassifyAndValidate" >> beam.ParDo(decode).with_outputs(DEAD_LETTER_TAG, main="events")
