"""The data contract (shared/SPEC.md) as typed records.

Pydantic validates what arrives from outside (Kafka, PostgreSQL); once validated, records travel through
the pipeline as frozen models so every stage sees the same, already-checked shape. Between stages they
travel in a compact pickle form (transforms/compact_pickle.py) that is not validated again.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

import orjson
from pydantic import ConfigDict, StrictInt, field_validator

from transforms.compact_pickle import CompactPickleModel

EventType = Literal["play", "pause", "finish", "click"]
EVENT_TYPES: tuple[str, ...] = ("play", "pause", "finish", "click")
ContentType = Literal["podcast", "newsletter", "video"]


def canonical_json(value: Any) -> str:
    """One textual form for a JSON value, whichever source it came from.

    Debezium sends JSONB as a string, PostgreSQL drivers return a dict and applications send an object;
    sorting keys and dropping whitespace makes streaming and backfill write byte-identical rows.
    """
    if not holds_float(value):
        # The bytes the standard library writes below, a tenth of its cost, for values without floats: orjson
        # writes exponents its own way (1e16, not 1e+16). What it refuses (integers beyond 64 bits, lone
        # surrogates, nesting past 255 levels) the standard library writes or refuses as it always did.
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except orjson.JSONEncodeError:
            pass
    # allow_nan=False: NaN and Infinity are not JSON, and neither JSONB nor BigQuery JSON holds them.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def holds_float(value: Any) -> bool:
    """Whether a JSON value holds a float anywhere."""
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        return any(map(holds_float, value.values()))
    if kind is list:
        return any(map(holds_float, value))
    return False


class EngagementEvent(CompactPickleModel):
    """One row of ``engagement_events``, validated."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: StrictInt
    content_id: UUID | None = None
    user_id: UUID | None = None
    event_type: EventType | None = None
    event_ts: datetime
    duration_ms: StrictInt | None = None
    device: str | None = None
    raw_payload: str | None = None
    committed_at_ms: int | None = None
    """When the source committed the row (Debezium's ``source.ts_ms``), in epoch ms; for freshness metrics
    only: no table has it, and it is unknown for plain events and the backfill."""

    @field_validator("event_ts")
    @classmethod
    def _event_ts_is_utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("event_ts has no UTC offset; refusing to guess its time zone")
        return value.astimezone(UTC)


class Content(CompactPickleModel):
    """One row of ``content``: what enrichment adds to an event."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: UUID
    slug: str
    title: str
    content_type: ContentType | None = None
    length_seconds: StrictInt | None = None
    publish_ts: datetime | None = None


class EnrichedEvent(CompactPickleModel):
    """An event with its content metadata and engagement metrics (SPEC §3)."""

    model_config = ConfigDict(frozen=True)

    event: EngagementEvent
    engagement_seconds: Decimal | None
    engagement_pct: Decimal | None
    content_type: str | None
    length_seconds: int | None
    title: str | None
    slug: str | None
    content_missing: bool
    """True when the event's content is unknown: it is kept, and left out of per-content rankings (SPEC §3)."""


class Stage(StrEnum):
    """Where a record was dead-lettered."""

    DECODE = "decode"
    ENRICH = "enrich"
    BIGQUERY = "bigquery"
    REDIS = "redis"
    HTTP = "http"


class SourceCoordinates(CompactPickleModel):
    """Where a record came from: a Kafka position, a PostgreSQL table row, or (``aggregate``) a record the
    pipeline derived itself, such as a window aggregate, which has no single source position."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["kafka", "postgres", "aggregate", "test"]
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    table: str | None = None
    row_id: int | None = None

    def describe(self) -> str:
        if self.kind == "kafka":
            return f"kafka:{self.topic}/{self.partition}@{self.offset}"
        if self.kind == "postgres":
            return f"postgres:{self.table}/{self.row_id}"
        return self.kind


class RawRecord(CompactPickleModel):
    """What the pipeline reads before any decoding: the bytes and where they came from."""

    model_config = ConfigDict(frozen=True)

    value: bytes | None
    key: bytes | None = None
    source: SourceCoordinates


class DeadLetter(CompactPickleModel):
    """One schema for every stage's rejects, so a single table and query cover all of them."""

    model_config = ConfigDict(frozen=True)

    stage: Stage
    reason: str
    payload_text: str | None
    payload_bytes: bytes | None
    source: SourceCoordinates
    event_id: int | None = None
    failed_at: datetime

    @classmethod
    def of(
        cls,
        stage: Stage,
        reason: str,
        payload: bytes | None,
        source: SourceCoordinates,
        event_id: int | None = None,
    ) -> DeadLetter:
        text = payload.decode("utf-8", errors="replace") if payload is not None else None
        return cls(
            stage=stage,
            reason=reason,
            payload_text=text,
            payload_bytes=payload,
            source=source,
            event_id=event_id,
            failed_at=datetime.now(UTC),
        )


class WindowAggregate(CompactPickleModel):
    """Per-content totals of one fixed event-time window, as of one fired pane (SPEC §5)."""

    model_config = ConfigDict(frozen=True)

    window_start: datetime
    window_end: datetime
    content_id: UUID | None
    content_missing: bool
    title: str | None
    slug: str | None
    content_type: str | None
    event_count: int
    play_count: int
    pause_count: int
    finish_count: int
    click_count: int
    engagement_seconds_sum: Decimal
    distinct_users: int
    pane_timing: str
    pane_index: int
    emitted_at: datetime
    oldest_commit_ms: int | None = None
    """The earliest source commit (epoch ms) among the events this pane added; freshness metrics only, not a
    column (rows.window_aggregate_row leaves it out)."""
