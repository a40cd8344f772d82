"""The pipeline's records as BigQuery table rows, column for column with sql/bigquery/001_tables.sql.

Values stay Python-native (datetime, Decimal, bytes); each sink encodes them for its own API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from transforms.model import DeadLetter, EnrichedEvent, WindowAggregate

Row = dict[str, Any]


def _text(value: object | None) -> str | None:
    return str(value) if value is not None else None


def enriched_event_row(enriched: EnrichedEvent, processed_at: datetime) -> Row:
    event = enriched.event
    return {
        "event_id": event.id,
        "content_id": _text(event.content_id),
        "user_id": _text(event.user_id),
        "event_type": event.event_type,
        "event_ts": event.event_ts,
        "duration_ms": event.duration_ms,
        "device": event.device,
        "raw_payload": event.raw_payload,
        "engagement_seconds": enriched.engagement_seconds,
        "engagement_pct": enriched.engagement_pct,
        "content_type": enriched.content_type,
        "length_seconds": enriched.length_seconds,
        "title": enriched.title,
        "slug": enriched.slug,
        "content_missing": enriched.content_missing,
        "processed_at": processed_at,
    }


def window_aggregate_row(aggregate: WindowAggregate) -> Row:
    return {**aggregate.model_dump(exclude={"oldest_commit_ms"}), "content_id": _text(aggregate.content_id)}


def dead_letter_row(dead_letter: DeadLetter) -> Row:
    source = dead_letter.source
    return {
        "stage": dead_letter.stage.value,
        "reason": dead_letter.reason,
        "payload_text": dead_letter.payload_text,
        "payload_bytes": dead_letter.payload_bytes,
        "source_kind": source.kind,
        "source_topic": source.topic,
        "source_partition": source.partition,
        "source_offset": source.offset,
        "source_table": source.table,
        "source_row_id": source.row_id,
        "event_id": dead_letter.event_id,
        "failed_at": dead_letter.failed_at,
    }
