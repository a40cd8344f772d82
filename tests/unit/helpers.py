"""Small builders shared by the DirectRunner tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from transforms.content import ContentSnapshot
from transforms.model import Content, RawRecord, SourceCoordinates

BASE = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
"""Window starts are multiples of a minute from here; BASE is itself a window boundary."""

PODCAST = Content(
    id=UUID("11111111-1111-4111-8111-111111111111"),
    slug="deep-dive-42",
    title="Deep Dive #42",
    content_type="podcast",
    length_seconds=1200,
)
VIDEO = Content(
    id=UUID("22222222-2222-4222-8222-222222222222"),
    slug="launch-video",
    title="Launch video",
    content_type="video",
    length_seconds=90,
)


def at(seconds: float) -> float:
    """Epoch seconds ``seconds`` after BASE."""
    return BASE.timestamp() + seconds


def plain_event(
    event_id: int,
    second: float,
    content: Content | None = PODCAST,
    duration_ms: int | None = 1000,
    user: int | None = 1,
    event_type: str | None = "play",
    **extra: Any,
) -> RawRecord:
    """A plain JSON event ``second`` seconds after BASE, as an application would send it."""
    document = {
        "id": event_id,
        "content_id": str(content.id) if content is not None else None,
        "user_id": f"00000000-0000-4000-8000-{user:012d}" if user is not None else None,
        "event_type": event_type,
        "event_ts": int(at(second) * 1000),
        "duration_ms": duration_ms,
        **extra,
    }
    return RawRecord(
        value=json.dumps(document).encode(),
        source=SourceCoordinates(kind="kafka", topic="events", partition=0, offset=event_id),
    )


_loads = iter(range(1, 1_000_000))


def snapshot(*contents: Content) -> ContentSnapshot:
    """A content snapshot loaded after every snapshot built before it."""
    return ContentSnapshot.of(contents, loaded_at=at(next(_loads)))
