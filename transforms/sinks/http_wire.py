"""The HTTP sink's wire format: each event as the API receives it, batches and their idempotency keys.

Nothing here depends on time or on an attempt, so a re-sent batch is byte-identical to its first send and
carries the same key (docs/http-sink.md, "Request").
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from transforms.model import EnrichedEvent

KEY_PREFIX = "engagement-events-v1-"
"""Versions the key derivation and the event schema together: changing either must change every key."""


# --- the endpoint in logs -------------------------------------------------------------------------------


def display_url(url: str) -> str:
    """The endpoint without user info or query string, which may carry credentials, for logs and reasons."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- the wire format ------------------------------------------------------------------------------------


def _decimal(value: Decimal | None) -> str | None:
    # Fixed-point text, never an exponent ("0.000", not "0E-3"), so consumers parse it exactly.
    return format(value, "f") if value is not None else None


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _timestamp(value: datetime) -> str:
    """Always six fractional digits and "Z", so equal instants are equal strings (``TIMESTAMP_FORMAT``)."""
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    if utc.year < 1000:  # isoformat pads the year to four digits; strftime, the format's definition, does not
        return utc.strftime(TIMESTAMP_FORMAT)
    # A quarter of strftime's cost, on every event the API gets.
    return utc.isoformat(timespec="microseconds")[:-6] + "Z"


def event_document(enriched: EnrichedEvent) -> dict[str, Any]:
    """One event as the API receives it (schema v1, docs/http-sink.md).

    Nothing here depends on processing time, so a re-sent event is byte-identical to its first send.
    """
    event = enriched.event
    return {
        "id": event.id,
        "content_id": str(event.content_id) if event.content_id is not None else None,
        "user_id": str(event.user_id) if event.user_id is not None else None,
        "event_type": event.event_type,
        "event_ts": _timestamp(event.event_ts),
        "duration_ms": event.duration_ms,
        "device": event.device,
        "raw_payload": event.raw_payload,
        "engagement_seconds": _decimal(enriched.engagement_seconds),
        "engagement_pct": _decimal(enriched.engagement_pct),
        "content_type": enriched.content_type,
        "length_seconds": enriched.length_seconds,
        "title": enriched.title,
        "slug": enriched.slug,
        "content_missing": enriched.content_missing,
    }


def encode_event(enriched: EnrichedEvent) -> bytes:
    """Compact UTF-8 JSON, as ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` writes it.

    orjson (a dependency of Beam's GCP extra) writes the same bytes for these documents, whose values are strings,
    64-bit integers, booleans and nulls, 17 times faster: the encoder was the largest of the per-event steps at
    3,000 events/s (docs/benchmarks.md, streaming session 21). What orjson refuses (text that is not valid
    Unicode, integers past 64 bits) goes through the standard library, which writes it or fails as it always
    did, with its own reason in the dead letter."""
    document = event_document(enriched)
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def shard_of_event(event_id: int, shards: int) -> int:
    # crc32 rather than hash(): the same id must land in the same shard on every worker and every run.
    return zlib.crc32(str(event_id).encode("ascii")) % shards


def idempotency_key(event_ids: Iterable[int]) -> str:
    """A key derived from the batch's ids alone: any retry or regrouping into the same set gets the same key."""
    digest = hashlib.sha256(",".join(str(i) for i in sorted(event_ids)).encode("ascii")).hexdigest()
    return KEY_PREFIX + digest


@dataclass(frozen=True)
class Batch:
    """A batch in its canonical form: events ordered by id, each id once."""

    events: tuple[tuple[int, bytes], ...]

    @classmethod
    def of(cls, encoded: Iterable[tuple[int, bytes]]) -> Batch:
        # State (bag) order is not guaranteed to survive a regrouping; sorting makes the body depend only on
        # which events are in the batch. A repeated id (possible only beyond the de-duplication horizon)
        # is sent once.
        unique: dict[int, bytes] = {}
        for event_id, payload in sorted(encoded):
            unique.setdefault(event_id, payload)
        return cls(tuple(unique.items()))

    @property
    def event_ids(self) -> list[int]:
        return [event_id for event_id, _ in self.events]

    @property
    def key(self) -> str:
        return idempotency_key(self.event_ids)

    def body(self) -> bytes:
        return b'{"events":[' + b",".join(payload for _, payload in self.events) + b"]}"
