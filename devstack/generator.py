"""Synthetic engagement data for the local stack: PostgreSQL rows for Debezium, or plain JSON on Kafka.

Two layers, kept apart on purpose:

* **Pure generation** (``ContentFactory``, ``EventFactory``, ``KafkaJsonEncoder``, ``plan_kinds`` …) turns a
  seeded ``random.Random`` plus the current time into rows and Kafka records, including every awkward case of
  shared/SPEC.md §2-3. Nothing in it touches a socket, so the unit tests pin its behaviour exactly.
* **Thin I/O** (``PostgresSink``, ``KafkaJsonSink``, ``run``) writes batches, one transaction (or one flushed
  produce) per batch, paced by a token bucket, and logs what it did to the optional manifest and commit log.

Run it through ``scripts/generate``; ``docs/generator.md`` describes the options, the id strategy of the
``kafka-json`` mode and measured insert rates.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum, StrEnum
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import IO, Any, Protocol

EVENT_TYPES: tuple[str, ...] = ("play", "pause", "finish", "click")
CONTENT_TYPES: tuple[str, ...] = ("podcast", "newsletter", "video")

# Plays dominate real players' telemetry; finishes are rare because most sessions are abandoned.
_EVENT_TYPE_WEIGHTS = (45, 25, 10, 20)
_DEVICES: tuple[str, ...] = (
    "ios",
    "android",
    "web-chrome",
    "web-safari",
    "web-firefox",
    "smart-tv",
    "car-play",
    "alexa",
)
_DEVICE_WEIGHTS = (30, 25, 18, 10, 4, 6, 4, 3)
_COUNTRIES: tuple[str, ...] = ("US", "GB", "DE", "FR", "BR", "IN", "JP", "CA", "AU", "ES")

# Content lengths in seconds per type, (min, max): a newsletter's length is its estimated reading time.
_LENGTH_RANGES: dict[str, tuple[int, int]] = {
    "podcast": (600, 5400),
    "newsletter": (120, 900),
    "video": (30, 3600),
}
# The catalogue is not perfectly clean even without --awkward: SPEC §1 allows both columns to be NULL.
_NULL_LENGTH_SHARE = 0.05
_NULL_CONTENT_TYPE_SHARE = 0.03
# Popularity follows a Zipf-like law so "top content" rankings have a stable head and a long tail.
_ZIPF_EXPONENT = 1.1
# A small share of finishes report more listening time than the content lasts (re-plays, SPEC §3: not capped).
_REPLAY_SHARE = 0.02

# Kafka-json ids when no database can hand out sequence values (--no-db): far above any BIGSERIAL value a
# development database will reach, yet below 2**53 so JSON tooling that reads numbers as doubles keeps them.
NO_DB_ID_BASE = 2**52

_TITLE_WORDS_A = (
    "Quiet", "Daily", "Deep", "Open", "Curious", "Midnight", "Practical", "Hidden", "Weekly", "Honest",
    "Small", "Long", "Bright", "Early", "Slow", "Wild",
)  # fmt: skip
_TITLE_WORDS_B = (
    "Signal", "Briefing", "Frontier", "Kitchen", "Circuit", "Harbor", "Ledger", "Atlas", "Garden", "Engine",
    "Studio", "Dispatch", "Notebook", "Canvas", "Orbit", "Archive",
)  # fmt: skip


class GeneratorError(RuntimeError):
    """A service could not be reached or refused the data; reported without a traceback."""


class _Unset(Enum):
    """Marks an argument the caller did not pass, where ``None`` is a meaningful value (a NULL column)."""

    TOKEN = 0


_UNSET = _Unset.TOKEN


class Kind(StrEnum):
    """What a generated record is meant to exercise; ``normal`` is a clean event."""

    NORMAL = "normal"
    NULL_USER_ID = "null_user_id"
    NULL_DEVICE = "null_device"
    NULL_RAW_PAYLOAD = "null_raw_payload"
    NULL_EVENT_TYPE = "null_event_type"
    NULL_DURATION = "null_duration_ms"
    NULL_CONTENT_ID = "null_content_id"
    NEGATIVE_DURATION = "negative_duration_ms"
    ZERO_LENGTH_CONTENT = "zero_length_content"
    NULL_LENGTH_CONTENT = "null_length_content"
    LATE = "late"
    OUT_OF_ORDER = "out_of_order"
    FRESH_CONTENT = "fresh_content"
    # Only meaningful on Kafka: PostgreSQL's primary key, foreign key and column types rule them out.
    DUPLICATE = "duplicate"
    UNKNOWN_CONTENT = "unknown_content"
    MALFORMED_NON_JSON = "malformed_non_json"
    MALFORMED_NOT_OBJECT = "malformed_not_object"
    MALFORMED_WRONG_TYPE = "malformed_wrong_type"
    MALFORMED_INVALID_UUID = "malformed_invalid_uuid"
    MALFORMED_MISSING_ID = "malformed_missing_id"
    MALFORMED_MISSING_EVENT_TS = "malformed_missing_event_ts"
    MALFORMED_BAD_EVENT_TYPE = "malformed_bad_event_type"
    # fuzz mode only: records that once stopped the job (issue 16); POISON_OUTCOMES says what each becomes.
    POISON_DEEP_NESTING = "poison_deep_nesting"
    POISON_RANDOM_BYTES = "poison_random_bytes"
    POISON_TRUNCATED_DEBEZIUM = "poison_truncated_debezium"
    POISON_TOO_LARGE = "poison_too_large"
    POISON_ID_STRING = "poison_id_string"
    POISON_NULL_VALUE = "poison_null_value"
    POISON_OTHER_TABLE = "poison_other_table"
    POISON_INVALID_UTF8 = "poison_invalid_utf8"
    POISON_OUT_OF_RANGE = "poison_out_of_range"
    POISON_JSON_ARRAY = "poison_json_array"
    POISON_NULL_KEY = "poison_null_key"

    @property
    def malformed(self) -> bool:
        return self.value.startswith("malformed_")

    @property
    def poison(self) -> bool:
        return self.value.startswith("poison_")


POSTGRES_KINDS: tuple[Kind, ...] = (
    Kind.NULL_USER_ID,
    Kind.NULL_DEVICE,
    Kind.NULL_RAW_PAYLOAD,
    Kind.NULL_EVENT_TYPE,
    Kind.NULL_DURATION,
    Kind.NULL_CONTENT_ID,
    Kind.NEGATIVE_DURATION,
    Kind.ZERO_LENGTH_CONTENT,
    Kind.NULL_LENGTH_CONTENT,
    Kind.LATE,
    Kind.OUT_OF_ORDER,
    Kind.FRESH_CONTENT,
)
KAFKA_ONLY_KINDS: tuple[Kind, ...] = (
    Kind.DUPLICATE,
    Kind.UNKNOWN_CONTENT,
    Kind.MALFORMED_NON_JSON,
    Kind.MALFORMED_NOT_OBJECT,
    Kind.MALFORMED_WRONG_TYPE,
    Kind.MALFORMED_INVALID_UUID,
    Kind.MALFORMED_MISSING_ID,
    Kind.MALFORMED_MISSING_EVENT_TS,
    Kind.MALFORMED_BAD_EVENT_TYPE,
)
POISON_KINDS: tuple[Kind, ...] = tuple(kind for kind in Kind if kind.poison)
# What the pipeline makes of each poison kind (SPEC §2-3): a dead letter, a counted skip, or a valid event.
POISON_OUTCOMES: dict[Kind, str] = {
    Kind.POISON_DEEP_NESTING: "dead_letter",
    Kind.POISON_RANDOM_BYTES: "dead_letter",
    Kind.POISON_TRUNCATED_DEBEZIUM: "dead_letter",
    Kind.POISON_TOO_LARGE: "dead_letter",
    Kind.POISON_ID_STRING: "dead_letter",
    Kind.POISON_NULL_VALUE: "skip",  # a tombstone
    Kind.POISON_OTHER_TABLE: "skip",  # a Debezium record of the content table
    Kind.POISON_INVALID_UTF8: "dead_letter",
    Kind.POISON_OUT_OF_RANGE: "dead_letter",
    Kind.POISON_JSON_ARRAY: "dead_letter",
    Kind.POISON_NULL_KEY: "event",  # the key is never read
}
POISON_NESTING_DEPTH = 1_000
POISON_TOO_LARGE_BYTES = 2_000_000
FUZZ_MAX_MESSAGE_BYTES = 3_000_000
"""Producer and topic limit in fuzz mode: Kafka's defaults (about 1 MB) would refuse the 2 MB record."""
MODES: tuple[str, ...] = ("postgres", "kafka-json", "fuzz")


def kinds_for_mode(mode: str, with_db: bool = True) -> tuple[Kind, ...]:
    """Awkward kinds a mode can produce; fresh content needs a database to be created in."""
    if mode == "postgres":
        kinds = POSTGRES_KINDS
    elif mode == "kafka-json":
        kinds = POSTGRES_KINDS + KAFKA_ONLY_KINDS
    elif mode == "fuzz":
        kinds = POISON_KINDS
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return kinds if with_db else tuple(k for k in kinds if k is not Kind.FRESH_CONTENT)


# ----------------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentItem:
    """One ``content`` row."""

    id: str
    slug: str
    title: str
    content_type: str | None
    length_seconds: int | None
    publish_ts: datetime

    def as_pg_tuple(self) -> tuple[Any, ...]:
        return (self.id, self.slug, self.title, self.content_type, self.length_seconds, self.publish_ts)


@dataclass(frozen=True)
class Event:
    """One ``engagement_events`` row before it has an id; ``kind`` says which case it exercises."""

    kind: Kind
    content_id: str | None
    user_id: str | None
    event_type: str | None
    event_ts: datetime
    duration_ms: int | None
    device: str | None
    raw_payload: dict[str, Any] | None

    def as_pg_tuple(self, event_id: int) -> tuple[Any, ...]:
        payload = None if self.raw_payload is None else json.dumps(self.raw_payload, separators=(",", ":"))
        return (
            event_id,
            self.content_id,
            self.user_id,
            self.event_type,
            self.event_ts,
            self.duration_ms,
            self.device,
            payload,
        )


@dataclass(frozen=True)
class KafkaRecord:
    """One message for the plain JSON topic; ``event_id`` is None when the record carries no usable id."""

    kind: Kind
    key: bytes | None
    value: bytes | None  # None: a tombstone
    event_id: int | None
    content_id: str | None


# ----------------------------------------------------------------------------------------------------------
# Pure generation
# ----------------------------------------------------------------------------------------------------------


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` so seeded runs are reproducible (``uuid.uuid4`` is not)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def truncate_to_millis(ts: datetime) -> datetime:
    """Plain JSON carries epoch millis; keeping every timestamp at that precision lets both sources agree."""
    return ts.replace(microsecond=ts.microsecond - ts.microsecond % 1000)


def slugify(text: str) -> str:
    out: list[str] = []
    for ch in text.lower():
        if ch.isalnum():
            out.append(ch)
        elif out and out[-1] != "-":
            out.append("-")
    return "".join(out).strip("-")


class ContentFactory:
    """Builds ``content`` rows: realistic titles and lengths, a few NULLs, and globally unique slugs."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def make(
        self,
        now: datetime,
        *,
        content_type: str | _Unset | None = _UNSET,
        length_seconds: int | _Unset | None = _UNSET,
        label: str = "",
    ) -> ContentItem:
        """One item; pass ``content_type``/``length_seconds`` (even ``None``) to force them."""
        rng = self._rng
        content_id = random_uuid(rng)
        if content_type is _UNSET:
            content_type = None if rng.random() < _NULL_CONTENT_TYPE_SHARE else rng.choice(CONTENT_TYPES)
        if length_seconds is _UNSET:
            if rng.random() < _NULL_LENGTH_SHARE:
                length_seconds = None
            else:
                low, high = _LENGTH_RANGES[content_type or rng.choice(CONTENT_TYPES)]
                length_seconds = rng.randint(low, high)
        number = rng.randint(1, 999)
        title = f"The {rng.choice(_TITLE_WORDS_A)} {rng.choice(_TITLE_WORDS_B)} #{number}"
        if label:
            title = f"{title} ({label})"
        # The id fragment makes the slug unique even when titles repeat, without a round trip to check.
        slug = f"{slugify(title)}-{content_id.replace('-', '')[:12]}"
        publish_ts = truncate_to_millis(now - timedelta(seconds=rng.randint(0, 180 * 86400)))
        return ContentItem(content_id, slug, title, content_type, length_seconds, publish_ts)

    def catalogue(self, count: int, now: datetime) -> list[ContentItem]:
        return [self.make(now) for _ in range(count)]

    def zero_length(self, now: datetime) -> ContentItem:
        return self.make(now, content_type=self._rng.choice(CONTENT_TYPES), length_seconds=0, label="zero length")

    def null_length(self, now: datetime) -> ContentItem:
        return self.make(now, content_type=self._rng.choice(CONTENT_TYPES), length_seconds=None, label="unknown length")

    def fresh(self, now: datetime) -> ContentItem:
        """Content published right now, whose events follow immediately (SPEC §3)."""
        content_type = self._rng.choice(CONTENT_TYPES)
        low, high = _LENGTH_RANGES[content_type]
        item = self.make(now, content_type=content_type, length_seconds=self._rng.randint(low, high), label="new")
        # A second before its first events, so no event precedes the publication it belongs to.
        return replace(item, publish_ts=truncate_to_millis(now - timedelta(seconds=1)))


class Catalogue:
    """The content events may point at, with a popularity skew and the special items awkward cases need."""

    def __init__(self, items: Sequence[ContentItem]) -> None:
        if not items:
            raise ValueError("the content catalogue is empty")
        self.items: list[ContentItem] = list(items)
        self._cum_weights = list(accumulate(1.0 / (rank**_ZIPF_EXPONENT) for rank in range(1, len(items) + 1)))
        self.zero_length = [c for c in items if c.length_seconds == 0]
        self.null_length = [c for c in items if c.length_seconds is None]

    def pick(self, rng: random.Random) -> ContentItem:
        return rng.choices(self.items, cum_weights=self._cum_weights)[0]


def parse_mix(
    mode: str,
    awkward: float = 0.0,
    awkward_kinds: Iterable[Kind] | None = None,
    explicit: dict[Kind, float] | None = None,
    with_db: bool = True,
) -> dict[Kind, float]:
    """Share of records per awkward kind.

    ``awkward`` is spread evenly over ``awkward_kinds`` (default: every kind the mode supports); ``explicit``
    shares are added on top. Kinds a mode cannot produce are refused rather than silently ignored.
    """
    allowed = kinds_for_mode(mode, with_db)
    kinds = tuple(awkward_kinds) if awkward_kinds is not None else allowed
    shares = [(k, awkward / len(kinds)) for k in kinds] + list((explicit or {}).items())
    mix: dict[Kind, float] = {}
    for kind, share in shares:
        if kind not in allowed:
            where = f"{mode} mode" if with_db else f"{mode} mode without a database"
            raise ValueError(f"{kind.value} is not possible in {where} (see docs/generator.md)")
        if share < 0:
            raise ValueError(f"negative share for {kind.value}")
        mix[kind] = mix.get(kind, 0.0) + share
    total = sum(mix.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"awkward shares add up to {total:.3f}, more than every record")
    return {k: v for k, v in mix.items() if v > 0}


def plan_kinds(rng: random.Random, n: int, mix: dict[Kind, float]) -> list[Kind]:
    """The kind of each of the next ``n`` records: each is awkward with the mix's total probability."""
    if not mix:
        return [Kind.NORMAL] * n
    kinds = list(mix)
    cum = list(accumulate(mix[k] for k in kinds))
    total = cum[-1]
    out: list[Kind] = []
    for _ in range(n):
        u = rng.random()
        if u >= total:
            out.append(Kind.NORMAL)
            continue
        for kind, bound in zip(kinds, cum, strict=True):
            if u < bound:
                out.append(kind)
                break
        else:  # floating-point edge at the top of the range
            out.append(kinds[-1])
    return out


@dataclass
class EventFactory:
    """Builds events for a catalogue and a user pool; each awkward kind changes exactly what SPEC names."""

    rng: random.Random
    catalogue: Catalogue
    users: Sequence[str]
    late_minutes: tuple[float, float] = (2.0, 15.0)
    out_of_order_seconds: tuple[float, float] = (5.0, 50.0)

    def __post_init__(self) -> None:
        if not self.users:
            raise ValueError("the user pool is empty")

    def _duration_ms(self, event_type: str, length_seconds: int | None) -> int | None:
        rng = self.rng
        if event_type == "click":
            return None  # a click has no duration (SPEC §1: NULL for events without duration)
        length = length_seconds if length_seconds else rng.randint(60, 1800)
        if event_type == "finish":
            share = rng.uniform(1.0, 1.6) if rng.random() < _REPLAY_SHARE else rng.uniform(0.85, 1.0)
        else:
            share = rng.betavariate(1.2, 3.0)
        return max(1, int(length * 1000 * share))

    def _raw_payload(self) -> dict[str, Any]:
        rng = self.rng
        payload: dict[str, Any] = {
            "app_version": f"{rng.randint(3, 6)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
            "session_id": f"{rng.getrandbits(64):016x}",
            "country": rng.choice(_COUNTRIES),
        }
        if rng.random() < 0.3:
            payload["referrer"] = rng.choice(("search", "newsletter", "social", "direct", "recommendation"))
        if rng.random() < 0.1:
            payload["experiment"] = {"id": f"exp-{rng.randint(1, 40)}", "arm": rng.choice(("a", "b"))}
        return payload

    def build(self, kind: Kind, now: datetime, fresh_content: ContentItem | None = None) -> Event:
        """One event of ``kind`` happening at ``now`` (or earlier, for the late kinds).

        Malformed and duplicate kinds are Kafka-level concerns: they get a clean event here, which the
        encoder then breaks or repeats.
        """
        rng = self.rng
        if kind is Kind.FRESH_CONTENT:
            if fresh_content is None:
                raise ValueError("a fresh_content event needs the content created for it")
            content = fresh_content
        elif kind is Kind.ZERO_LENGTH_CONTENT:
            content = self._special(self.catalogue.zero_length, kind)
        elif kind is Kind.NULL_LENGTH_CONTENT:
            content = self._special(self.catalogue.null_length, kind)
        else:
            content = self.catalogue.pick(rng)

        event_type: str | None = rng.choices(EVENT_TYPES, weights=_EVENT_TYPE_WEIGHTS)[0]
        if kind in (Kind.NULL_DURATION, Kind.NEGATIVE_DURATION) and event_type == "click":
            # A NULL duration on a click is unremarkable; these kinds need an event that normally has one.
            event_type = rng.choice(("play", "pause", "finish"))
        duration_ms = self._duration_ms(event_type, content.length_seconds)

        event_ts = now - timedelta(milliseconds=rng.randint(0, 250))  # client clocks and buffering
        if kind is Kind.LATE:
            event_ts = now - timedelta(minutes=rng.uniform(*self.late_minutes))
        elif kind is Kind.OUT_OF_ORDER:
            event_ts = now - timedelta(seconds=rng.uniform(*self.out_of_order_seconds))

        content_id: str | None = content.id
        user_id: str | None = rng.choice(self.users)
        device: str | None = rng.choices(_DEVICES, weights=_DEVICE_WEIGHTS)[0]
        raw_payload: dict[str, Any] | None = self._raw_payload()

        if kind is Kind.NULL_USER_ID:
            user_id = None
        elif kind is Kind.NULL_DEVICE:
            device = None
        elif kind is Kind.NULL_RAW_PAYLOAD:
            raw_payload = None
        elif kind is Kind.NULL_EVENT_TYPE:
            event_type = None
        elif kind is Kind.NULL_DURATION:
            duration_ms = None
        elif kind is Kind.NEGATIVE_DURATION:
            duration_ms = -rng.randint(1, 60_000)
        elif kind is Kind.NULL_CONTENT_ID:
            content_id = None
        elif kind is Kind.UNKNOWN_CONTENT:
            content_id = random_uuid(rng)

        return Event(
            kind=kind,
            content_id=content_id,
            user_id=user_id,
            event_type=event_type,
            event_ts=truncate_to_millis(event_ts),
            duration_ms=duration_ms,
            device=device,
            raw_payload=raw_payload,
        )

    def _special(self, items: list[ContentItem], kind: Kind) -> ContentItem:
        if not items:
            raise ValueError(f"{kind.value} needs such content in the catalogue; see ensure_special_content")
        return self.rng.choice(items)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def format_event_ts(ts: datetime, rng: random.Random) -> str | int:
    """SPEC §2 allows ISO-8601 or epoch millis; applications use all of these, so the generator does too."""
    choice = rng.randrange(4)
    if choice == 0:
        return (ts - _EPOCH) // timedelta(milliseconds=1)
    if choice == 1:
        return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if choice == 2:
        return ts.astimezone(UTC).isoformat(timespec="milliseconds")
    # Same instant, local offset of the client: the pipeline must normalise, not assume UTC.
    offset = timezone(timedelta(hours=rng.choice((-7, -5, 1, 2, 5.5, 9))))
    return ts.astimezone(offset).isoformat(timespec="milliseconds")


def event_to_json_obj(event: Event, event_id: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": event_id,
        "content_id": event.content_id,
        "user_id": event.user_id,
        "event_type": event.event_type,
        "event_ts": format_event_ts(event.event_ts, rng),
        "duration_ms": event.duration_ms,
        "device": event.device,
        # Applications send the extra data as an object; Debezium would send JSONB as a string (SPEC §2).
        "raw_payload": event.raw_payload,
    }


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def malformed_value(kind: Kind, obj: dict[str, Any], rng: random.Random) -> tuple[bytes, int | None]:
    """Break a valid JSON event the way ``kind`` says; returns the bytes and the id they still carry, if any.

    Each variant is unambiguous: no lenient parser could read it as a valid event (e.g. a wrong type is never
    a numeric string that might be coerced).
    """
    obj = dict(obj)
    event_id: int | None = obj["id"]
    if kind is Kind.MALFORMED_NON_JSON:
        variants = (
            b"\xff\xfe\x00garbage\x81",
            b'{"id": ' + str(event_id).encode() + b', "event_type": "play"',  # truncated object
            b"id=" + str(event_id).encode() + b"&event_type=play",
            b"<event><id>" + str(event_id).encode() + b"</id></event>",
        )
        return rng.choice(variants), None
    if kind is Kind.MALFORMED_NOT_OBJECT:
        variants_obj: tuple[Any, ...] = ([obj], [event_id, obj["event_type"]], "play", 42)
        return _dumps(rng.choice(variants_obj)), None
    if kind is Kind.MALFORMED_WRONG_TYPE:
        field_name = rng.choice(("id", "duration_ms", "user_id", "event_ts", "device"))
        wrong: dict[str, Any] = {
            "id": f"evt-{event_id}",
            "duration_ms": "a while",
            "user_id": rng.randint(1, 10**9),
            "event_ts": {"seconds": 1},
            "device": ["ios", "web"],
        }
        obj[field_name] = wrong[field_name]
        return _dumps(obj), None if field_name == "id" else event_id
    if kind is Kind.MALFORMED_INVALID_UUID:
        field_name = rng.choice(("content_id", "user_id"))
        obj[field_name] = rng.choice(("not-a-uuid", "12345", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", "0f8e2c1a-77"))
        return _dumps(obj), event_id
    if kind is Kind.MALFORMED_MISSING_ID:
        if rng.random() < 0.5:
            del obj["id"]
        else:
            obj["id"] = None
        return _dumps(obj), None
    if kind is Kind.MALFORMED_MISSING_EVENT_TS:
        if rng.random() < 0.5:
            del obj["event_ts"]
        else:
            obj["event_ts"] = None
        return _dumps(obj), event_id
    if kind is Kind.MALFORMED_BAD_EVENT_TYPE:
        obj["event_type"] = rng.choice(("share", "seek", "download", "like", "impression"))
        return _dumps(obj), event_id
    raise ValueError(f"{kind.value} is not a malformed kind")


def _debezium_envelope(table: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"before": None, "after": row, "source": {"connector": "postgresql", "table": table}, "op": "c"}


def poison_record(kind: Kind, obj: dict[str, Any], rng: random.Random) -> tuple[bytes | None, bytes | None, int | None]:
    """(key, value, id the pipeline will see) of one poison record built from a valid event ``obj``."""
    event_id = obj["id"]
    key = str(event_id).encode()
    cdc_row = {**obj, "event_ts": _EPOCH.isoformat(), "raw_payload": json.dumps(obj["raw_payload"])}
    if kind is Kind.POISON_DEEP_NESTING:
        return key, b'{"a":' * POISON_NESTING_DEPTH + b"1" + b"}" * POISON_NESTING_DEPTH, None
    if kind is Kind.POISON_RANDOM_BYTES:
        # 0xff never occurs in UTF-8, so no draw can happen to be a valid (or empty) record.
        return key, b"\xff" + rng.randbytes(rng.randint(1, 200)), None
    if kind is Kind.POISON_TRUNCATED_DEBEZIUM:
        whole = _dumps(_debezium_envelope("engagement_events", cdc_row))
        return key, whole[: rng.randint(len(whole) // 4, len(whole) - 2)], None
    if kind is Kind.POISON_TOO_LARGE:
        return key, _dumps({**obj, "device": "x" * POISON_TOO_LARGE_BYTES}), None
    if kind is Kind.POISON_ID_STRING:
        return key, _dumps({**obj, "id": str(event_id)}), None
    if kind is Kind.POISON_NULL_VALUE:
        return key, None, None
    if kind is Kind.POISON_OTHER_TABLE:
        content = {"id": obj["content_id"], "slug": "fuzz", "title": "fuzz", "publish_ts": _EPOCH.isoformat()}
        return key, _dumps(_debezium_envelope("content", content)), None
    if kind is Kind.POISON_INVALID_UTF8:
        return key, _dumps({**obj, "device": "@@"}).replace(b'"@@"', b'"\xc3\x28\xff"'), None
    if kind is Kind.POISON_OUT_OF_RANGE:
        return key, _dumps({**obj, "id": 10**30, "event_ts": -(10**20)}), None
    if kind is Kind.POISON_JSON_ARRAY:
        return key, _dumps([obj]), None
    if kind is Kind.POISON_NULL_KEY:
        return None, _dumps(obj), event_id
    raise ValueError(f"{kind.value} is not a poison kind")


class KafkaJsonEncoder:
    """Turns events into plain-JSON Kafka records, breaking or repeating them as their kind asks.

    A duplicate re-sends the exact bytes and key of a recent valid record, as a producer retry or connector
    restart would; it therefore carries no event of its own.
    """

    def __init__(self, rng: random.Random, remember: int = 2000) -> None:
        self._rng = rng
        self._recent: deque[KafkaRecord] = deque(maxlen=remember)

    def encode(self, event: Event, event_id: int) -> KafkaRecord:
        obj = event_to_json_obj(event, event_id, self._rng)
        if event.kind.malformed:
            value, carried_id = malformed_value(event.kind, obj, self._rng)
            key = str(carried_id).encode() if carried_id is not None else None
            return KafkaRecord(event.kind, key, value, carried_id, event.content_id)
        if event.kind.poison:
            poison_key, poison_value, carried_id = poison_record(event.kind, obj, self._rng)
            return KafkaRecord(event.kind, poison_key, poison_value, carried_id, event.content_id)
        record = KafkaRecord(event.kind, str(event_id).encode(), _dumps(obj), event_id, event.content_id)
        self._recent.append(record)
        return record

    @property
    def has_history(self) -> bool:
        return bool(self._recent)

    def duplicate(self) -> KafkaRecord:
        """A byte-identical repeat of a recent valid record."""
        if not self._recent:
            raise ValueError("nothing has been sent yet that could be duplicated")
        original = self._rng.choice(self._recent)
        return replace(original, kind=Kind.DUPLICATE)


def resolve_duplicates(kinds: Sequence[Kind], has_history: bool) -> list[Kind]:
    """Turn duplicates that have nothing to repeat yet (start of a run) into normal events."""
    out: list[Kind] = []
    seen_valid = has_history
    for kind in kinds:
        if kind is Kind.DUPLICATE and not seen_valid:
            kind = Kind.NORMAL
        out.append(kind)
        if kind is not Kind.DUPLICATE and not kind.malformed:
            seen_valid = True
    return out


@dataclass
class BatchPlan:
    """What one batch will write: optional content first (its own transaction), then the events."""

    kinds: list[Kind]
    events: list[Event]
    fresh_content: ContentItem | None


@dataclass
class BatchPlanner:
    """Decides and builds each batch; pure apart from the clock value it is handed."""

    rng: random.Random
    content_factory: ContentFactory
    events: EventFactory
    encoder: KafkaJsonEncoder
    mix: dict[Kind, float]

    def plan(self, n: int, now: datetime) -> BatchPlan:
        kinds = resolve_duplicates(plan_kinds(self.rng, n, self.mix), self.encoder.has_history)
        # One new content item per batch is enough to exercise "content created just before its events".
        fresh = self.content_factory.fresh(now) if Kind.FRESH_CONTENT in kinds else None
        built = [self.events.build(k, now, fresh) for k in kinds if k is not Kind.DUPLICATE]
        return BatchPlan(kinds, built, fresh)

    def kafka_records(self, plan: BatchPlan, ids: Sequence[int]) -> list[KafkaRecord]:
        """Encode a plan with one id per built event; duplicates repeat records sent before them."""
        if len(ids) != len(plan.events):
            raise ValueError(f"{len(plan.events)} events need as many ids, got {len(ids)}")
        built, new_ids = iter(plan.events), iter(ids)
        return [
            self.encoder.duplicate() if kind is Kind.DUPLICATE else self.encoder.encode(next(built), next(new_ids))
            for kind in plan.kinds
        ]


# ----------------------------------------------------------------------------------------------------------
# Pacing
# ----------------------------------------------------------------------------------------------------------


_TOKEN_EPSILON = 1e-6


class TokenBucket:
    """Releases work at ``rate`` units per second on average, allowing bursts up to ``capacity``.

    Tokens keep accruing while a batch is being written, so per-batch overhead does not lower the long-run
    rate; the capacity bounds how much a stall (a checkpoint, a GC pause) is caught up at once.
    """

    def __init__(
        self,
        rate: float,
        capacity: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._sleep = sleep
        self._tokens = 0.0
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise ValueError(f"cannot take {n} tokens from a bucket of {self.capacity}")
        self._refill()
        while self._tokens < n - _TOKEN_EPSILON:
            # Never sleep less than a millisecond: a float shortfall of 1e-12 tokens would otherwise spin.
            self._sleep(max((n - self._tokens) / self.rate, 0.001))
            self._refill()
        self._tokens -= n


def default_batch_size(rate: float) -> int:
    """About ten transactions a second: big enough for throughput, small enough to keep commit latency low."""
    if rate <= 0:
        return 1000
    return max(1, min(2000, math.ceil(rate / 10)))


# ----------------------------------------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------------------------------------


class IdSource(Protocol):
    def take(self, n: int) -> list[int]: ...


@dataclass
class CounterIds:
    """Consecutive ids from ``start``; for kafka-json without a database (see docs/generator.md)."""

    start: int

    def take(self, n: int) -> list[int]:
        ids = list(range(self.start, self.start + n))
        self.start += n
        return ids


def no_db_id_start(now: float | None = None) -> int:
    """A start id for --no-db runs: ``NO_DB_ID_BASE`` plus 1000 ids per millisecond since the epoch.

    Consecutive runs therefore never overlap unless one produced more than a million events per second.
    """
    millis = int((time.time() if now is None else now) * 1000)
    return NO_DB_ID_BASE + millis * 1000


COLUMN_RECHECK_SECONDS = 10.0
"""While a SPEC column is missing from the live table, how often the generator looks whether it is back."""


class PostgresSink:
    """Writes content and events to PostgreSQL, one transaction per batch."""

    EVENT_COLUMNS = ("id", "content_id", "user_id", "event_type", "event_ts", "duration_ms", "device", "raw_payload")
    """The SPEC columns, in ``Event.as_pg_tuple``'s order."""

    def __init__(self, dsn: str) -> None:
        import psycopg2  # imported here so the pure layer and --no-db runs do not need a driver

        try:
            self._conn = psycopg2.connect(dsn, application_name="engagement-generator", connect_timeout=10)
        except psycopg2.OperationalError as exc:
            raise GeneratorError(f"cannot connect to PostgreSQL ({exc}); is the stack up (scripts/stack up)?") from exc
        with self._conn.cursor() as cur:
            cur.execute("SELECT pg_get_serial_sequence('engagement_events', 'id')")
            self._sequence: str = cur.fetchone()[0]
        self._conn.commit()
        self._dsn = dsn
        self._columns_missing: tuple[str, ...] = ()
        self._columns = self._live_columns()

    def close(self) -> None:
        self._conn.close()

    def load_content(self) -> list[ContentItem]:
        with self._conn.cursor() as cur:
            # Oldest first, so a catalogue grown over several runs keeps its popularity ranking stable.
            cur.execute(
                "SELECT id::text, slug, title, content_type, length_seconds, publish_ts FROM content "
                "ORDER BY publish_ts, id"
            )
            rows = cur.fetchall()
        self._conn.commit()
        return [ContentItem(*row) for row in rows]

    def insert_content(self, items: Sequence[ContentItem]) -> float:
        from psycopg2.extras import execute_values

        with self._conn.cursor() as cur:
            execute_values(
                cur,
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts) VALUES %s",
                [c.as_pg_tuple() for c in items],
                page_size=max(1, len(items)),
            )
        self._conn.commit()
        return time.time()

    def take(self, n: int) -> list[int]:
        """Reserve ``n`` ids from the table's own sequence, for events that never become rows (kafka-json).

        The commit makes the sequence advance durable before the ids leave the database.
        """
        ids = self._reserve(n)
        self._conn.commit()
        return ids

    def _reserve(self, n: int) -> list[int]:
        with self._conn.cursor() as cur:
            cur.execute("SELECT nextval(%s) FROM generate_series(1, %s)", (self._sequence, n))
            return [row[0] for row in cur.fetchall()]

    def insert_events(self, events: Sequence[Event]) -> tuple[list[int], float]:
        """Insert events in one transaction; returns their ids and the wall-clock time just after the commit.

        Ids are reserved explicitly rather than read back with RETURNING so each id maps to its event by
        position with certainty, and COPY is several times cheaper than a multi-row INSERT.
        """
        import psycopg2

        if self._columns != self.EVENT_COLUMNS and time.monotonic() >= self._recheck_columns_at:
            # A column was missing: it may be back (renamed back, or re-added).
            self._columns = self._live_columns()
        try:
            ids = self._copy_events(events)
        except psycopg2.errors.UndefinedColumn:
            # The table changed under load (a column renamed or dropped): name the columns again, once.
            self._conn.rollback()
            self._columns = self._live_columns()
            ids = self._copy_events(events)
        self._conn.commit()
        return ids, time.time()

    def _copy_events(self, events: Sequence[Event]) -> list[int]:
        positions = [self.EVENT_COLUMNS.index(column) for column in self._columns]
        with self._conn.cursor() as cur:
            ids = self._reserve(len(events))
            rows = (e.as_pg_tuple(i) for e, i in zip(events, ids, strict=True))
            buf = _CopyBuffer(tuple(row[p] for p in positions) for row in rows)
            cur.copy_expert(f"COPY engagement_events ({', '.join(self._columns)}) FROM STDIN", buf)
        return ids

    def _live_columns(self) -> tuple[str, ...]:
        """The SPEC columns the live table has, in SPEC order. A nullable one it lacks is left out (its events
        lose that value), with a warning; a missing ``id`` or ``event_ts`` stops the generator."""
        # The pipeline's own rules (imported here: they pull in Beam, which --no-db runs do not need).
        from transforms.decode import REQUIRED_COLUMNS
        from transforms.postgres_source import missing_event_columns

        missing = tuple(missing_event_columns(self._dsn))
        for column in REQUIRED_COLUMNS:
            if column in missing:
                raise GeneratorError(
                    f"engagement_events has no column {column!r} (renamed or dropped?); the generator cannot "
                    "write events without it"
                )
        if missing and missing != self._columns_missing:
            print(
                f"generator: warning: engagement_events has no column {', '.join(missing)} (renamed or dropped?); "
                "writing events without it",
                file=sys.stderr,
            )
        elif not missing and self._columns_missing:
            print("generator: engagement_events has every SPEC column again", file=sys.stderr)
        self._columns_missing = missing
        self._recheck_columns_at = time.monotonic() + COLUMN_RECHECK_SECONDS
        return tuple(column for column in self.EVENT_COLUMNS if column not in missing)


def _copy_text(value: Any) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


class _CopyBuffer:
    """A file-like object feeding rows to COPY; built in one go because batches are small."""

    def __init__(self, rows: Iterable[tuple[Any, ...]]) -> None:
        text = "".join("\t".join(_copy_text(v) for v in row) + "\n" for row in rows)
        self._data = text.encode()
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = len(self._data) - self._pos
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk

    readline = read


class KafkaJsonSink:
    """Produces plain JSON records; a batch counts as committed once every record in it is acknowledged."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        partitions: int,
        max_message_bytes: int | None = None,
        record_positions: bool = False,
    ) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

        from devstack.kafka import ensure_topic
        from devstack.process import StackError

        self._topic = topic
        # Created here so the generator works on a fresh broker; an existing topic is left as configured.
        config = {"max.message.bytes": str(max_message_bytes)} if max_message_bytes else {}
        try:
            created = ensure_topic(bootstrap, topic, partitions, config)
        except StackError as exc:
            raise GeneratorError(f"{exc}; is the stack up?") from exc
        if max_message_bytes and not created:
            # An existing topic keeps its other settings; only its record size limit is raised.
            entry = ConfigEntry(
                "max.message.bytes", str(max_message_bytes), incremental_operation=AlterConfigOpType.SET
            )
            resource = ConfigResource("topic", topic, incremental_configs=[entry])
            admin = AdminClient({"bootstrap.servers": bootstrap})
            for future in admin.incremental_alter_configs([resource]).values():
                future.result(timeout=30)
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 5,
                "acks": "all",
                # Duplicates must be the generator's deliberate ones only, not accidental retries.
                "enable.idempotence": True,
                "compression.type": "lz4",
                **({"message.max.bytes": max_message_bytes} if max_message_bytes else {}),
            }
        )
        self._errors: list[str] = []
        self.positions: list[tuple[KafkaRecord, int, int]] | None = [] if record_positions else None
        """(record, partition, offset) of each delivered record, when asked for (tests)."""

    def _on_delivery(self, record: KafkaRecord, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))
        elif self.positions is not None:
            self.positions.append((record, msg.partition(), msg.offset()))

    def send(self, records: Sequence[KafkaRecord]) -> float:
        for record in records:
            while True:
                try:
                    self._producer.produce(
                        self._topic, record.value, record.key, on_delivery=partial(self._on_delivery, record)
                    )
                    break
                except BufferError:  # local queue full: let librdkafka drain it
                    self._producer.poll(0.05)
        remaining = self._producer.flush(30)
        if remaining or self._errors:
            raise GeneratorError(f"Kafka delivery failed: {remaining} undelivered, errors: {self._errors[:3]}")
        return time.time()

    def close(self) -> None:
        self._producer.flush(30)


# ----------------------------------------------------------------------------------------------------------
# The run loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    mode: str = "postgres"
    rate: float = 1000.0
    duration: float | None = None
    count: int | None = None
    content: int = 200
    users: int = 10_000
    seed: int | None = None
    batch_size: int | None = None
    mix: dict[Kind, float] = field(default_factory=dict)
    late_minutes: tuple[float, float] = (2.0, 15.0)
    dsn: str | None = None
    no_db: bool = False
    bootstrap: str | None = None
    topic: str = "engagement.events.json"
    partitions: int = 3
    manifest: Path | None = None
    commit_log: Path | None = None
    quiet: bool = False


@dataclass
class Summary:
    mode: str
    seed: int
    target_rate: float
    records: int
    content_created: int
    seconds: float
    kinds: dict[str, int]

    @property
    def achieved_rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> str:
        return json.dumps(
            {
                "mode": self.mode,
                "seed": self.seed,
                "target_rate": self.target_rate,
                "records": self.records,
                "content_created": self.content_created,
                "seconds": round(self.seconds, 3),
                "achieved_rate": round(self.achieved_rate, 1),
                "kinds": self.kinds,
            }
        )


class _JsonLines:
    """An append-only JSON-lines log, flushed per batch so a benchmark can follow it live."""

    def __init__(self, path: Path | None) -> None:
        self._fh: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = path.open("a", encoding="utf-8")

    def write(self, entries: Iterable[dict[str, Any]]) -> None:
        if self._fh is not None:
            self._fh.write("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


class _Progress:
    def __init__(self, target_rate: float, quiet: bool, out: IO[str]) -> None:
        self._target = target_rate
        self._quiet = quiet
        self._out = out
        self._start = time.monotonic()
        self._last_at = self._start
        self._last_total = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def tick(self, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if self._quiet or (now - self._last_at < 1.0 and not force):
            return
        window = max(now - self._last_at, 1e-9)
        overall = total / max(now - self._start, 1e-9)
        target = f"{self._target:.0f}/s" if self._target > 0 else "unlimited"
        print(
            f"[{now - self._start:7.1f}s] target {target}  achieved {overall:8.1f}/s"
            f"  (last {window:.1f}s: {(total - self._last_total) / window:8.1f}/s)  total {total}",
            file=self._out,
            flush=True,
        )
        self._last_at, self._last_total = now, total


def ensure_special_content(
    existing: Sequence[ContentItem], factory: ContentFactory, mix: dict[Kind, float], now: datetime
) -> list[ContentItem]:
    """Content that the requested awkward kinds need and the catalogue lacks."""
    needed: list[ContentItem] = []
    if Kind.ZERO_LENGTH_CONTENT in mix and not any(c.length_seconds == 0 for c in existing):
        needed.append(factory.zero_length(now))
    if Kind.NULL_LENGTH_CONTENT in mix and not any(c.length_seconds is None for c in existing):
        needed.append(factory.null_length(now))
    return needed


def make_users(rng: random.Random, n: int) -> list[str]:
    return [random_uuid(rng) for _ in range(n)]


def _stop_at(opts: Options, start: float) -> Callable[[int], int]:
    """How many records the next batch may still contain (0 = stop)."""

    def remaining(done: int) -> int:
        left = sys.maxsize
        if opts.count is not None:
            left = opts.count - done
        if opts.duration is not None and time.monotonic() - start >= opts.duration:
            left = 0
        return max(0, left)

    return remaining


def run(opts: Options, log: IO[str] = sys.stderr) -> Summary:
    """Generate until --count/--duration is reached or SIGINT/SIGTERM arrives; returns what was done."""
    if opts.mode not in MODES:
        raise ValueError(f"unknown mode {opts.mode!r}")
    if opts.no_db and opts.mode == "postgres":
        raise ValueError("--no-db only applies to kafka-json mode")
    if opts.no_db and Kind.FRESH_CONTENT in opts.mix:
        raise ValueError("fresh_content needs the database to create the content in")

    from devstack.config import load_config

    cfg = load_config()
    seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(2**31)
    batch_size = opts.batch_size or default_batch_size(opts.rate)
    now = datetime.now(UTC)

    db = None if opts.no_db else PostgresSink(opts.dsn or cfg.pg_dsn)
    existing = db.load_content() if db else []
    # Mixing the catalogue size into the seed keeps a seeded run reproducible for a given database state while
    # a rerun against a database it already filled draws new content ids instead of colliding with its own.
    rng = random.Random(f"{seed}:{len(existing)}")
    content_factory = ContentFactory(rng)
    new_content = content_factory.catalogue(max(0, opts.content - len(existing)), now)
    new_content += ensure_special_content(existing + new_content, content_factory, opts.mix, now)
    if db and new_content:
        db.insert_content(new_content)
    catalogue = Catalogue(existing + new_content)
    events = EventFactory(rng, catalogue, make_users(rng, opts.users), late_minutes=opts.late_minutes)

    planner = BatchPlanner(rng, content_factory, events, KafkaJsonEncoder(rng), opts.mix)
    ids: IdSource = db if db else CounterIds(no_db_id_start())
    kafka = None
    if opts.mode in ("kafka-json", "fuzz"):
        kafka = KafkaJsonSink(
            opts.bootstrap or cfg.kafka_bootstrap,
            opts.topic,
            opts.partitions,
            max_message_bytes=FUZZ_MAX_MESSAGE_BYTES if opts.mode == "fuzz" else None,
        )

    manifest, commit_log = _JsonLines(opts.manifest), _JsonLines(opts.commit_log)
    manifest.write(_manifest_content(c, _content_kind(c)) for c in new_content)
    content_created = len(new_content)

    stopping = False

    def _stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    # One second of burst lets the bucket catch up after a stall without flooding the database.
    # Starting empty, each batch waits for the tokens it uses: the achieved rate never overshoots the target,
    # and a short run undershoots by at most one batch interval.
    bucket = TokenBucket(opts.rate, max(batch_size, opts.rate)) if opts.rate > 0 else None
    progress = _Progress(opts.rate, opts.quiet, log)
    remaining = _stop_at(opts, time.monotonic())
    if not opts.quiet:
        print(
            f"generator: mode={opts.mode} seed={seed} batch={batch_size} catalogue={len(catalogue.items)} "
            f"(created {content_created})",
            file=log,
            flush=True,
        )

    total, batch_no = 0, 0
    kind_counts: dict[str, int] = {}
    try:
        while not stopping:
            n = min(batch_size, remaining(total))
            if n == 0:
                break
            if bucket:
                bucket.acquire(n)
            plan = planner.plan(n, datetime.now(UTC))

            if plan.fresh_content is not None:
                # Its own transaction, committed just before the events' one: the pipeline sees the content
                # row only moments before the events that need it.
                if db:
                    db.insert_content([plan.fresh_content])
                content_created += 1
                manifest.write([_manifest_content(plan.fresh_content, Kind.FRESH_CONTENT.value)])

            if kafka is None:
                assert db is not None  # postgres mode always has a database
                event_ids, committed_at = db.insert_events(plan.events)
                entries = [
                    _manifest_event(e.kind, i, e.content_id, batch_no)
                    for e, i in zip(plan.events, event_ids, strict=True)
                ]
                sent_ids: list[int] = event_ids
            else:
                records = planner.kafka_records(plan, ids.take(len(plan.events)))
                committed_at = kafka.send(records)
                entries = [_manifest_event(r.kind, r.event_id, r.content_id, batch_no) for r in records]
                sent_ids = [r.event_id for r in records if r.event_id is not None]

            manifest.write(entries)
            if sent_ids:
                commit_log.write([_commit_entry(batch_no, sent_ids, len(entries), committed_at)])
            manifest.flush()
            commit_log.flush()
            for entry in entries:
                kind_counts[entry["kind"]] = kind_counts.get(entry["kind"], 0) + 1
            total += len(entries)
            batch_no += 1
            progress.tick(total)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.tick(total, force=True)
        manifest.close()
        commit_log.close()
        if kafka:
            kafka.close()
        if db:
            db.close()

    return Summary(opts.mode, seed, opts.rate, total, content_created, progress.elapsed, kind_counts)


def _commit_entry(batch: int, ids: Sequence[int], count: int, committed_at: float) -> dict[str, Any]:
    return {
        "batch": batch,
        "first_id": min(ids),
        "last_id": max(ids),
        "count": count,
        "committed_at": committed_at,
    }


def _manifest_content(item: ContentItem, kind: str) -> dict[str, Any]:
    return {"type": "content", "id": item.id, "kind": kind, "length_seconds": item.length_seconds}


def _content_kind(item: ContentItem) -> str:
    if item.length_seconds == 0:
        return Kind.ZERO_LENGTH_CONTENT.value
    if item.length_seconds is None:
        return Kind.NULL_LENGTH_CONTENT.value
    return "catalogue"


def _manifest_event(kind: Kind, event_id: int | None, content_id: str | None, batch: int) -> dict[str, Any]:
    return {"type": "event", "id": event_id, "kind": kind.value, "content_id": content_id, "batch": batch}


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _parse_case(text: str) -> tuple[Kind, float]:
    name, sep, share = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=FRACTION, got {text!r}")
    return _parse_kind(name), float(share)


def _parse_kind(name: str) -> Kind:
    try:
        return Kind(name.strip())
    except ValueError:
        known = ", ".join(k.value for k in Kind if k is not Kind.NORMAL)
        raise argparse.ArgumentTypeError(f"unknown kind {name!r}; known: {known}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/generate",
        description="Generate engagement data for the local stack (see docs/generator.md).",
    )
    p.add_argument(
        "mode",
        nargs="?",
        choices=MODES,
        default="postgres",
        help="where events go (default: postgres); fuzz: kafka-json with the poison records of issue 16",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="records per second; 0 = as fast as possible")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    stop.add_argument("--count", type=int, help="records to generate")
    p.add_argument("--content", type=int, default=200, help="content items to have; created at start if fewer")
    p.add_argument("--users", type=int, default=10_000, help="size of the user pool")
    p.add_argument("--seed", type=int, help="seed for reproducible data (default: random, printed)")
    p.add_argument("--batch-size", type=int, help="records per transaction/produce batch (default: rate/10)")
    p.add_argument("--awkward", type=float, default=0.0, metavar="FRACTION", help="share of awkward records")
    p.add_argument(
        "--awkward-kinds",
        type=lambda s: [_parse_kind(x) for x in s.split(",") if x.strip()],
        metavar="K1,K2",
        help="restrict --awkward to these kinds (default: all the mode supports)",
    )
    p.add_argument(
        "--case",
        type=_parse_case,
        action="append",
        default=[],
        metavar="KIND=FRACTION",
        help="explicit share for one kind, added to --awkward; repeatable",
    )
    p.add_argument("--list-kinds", action="store_true", help="list the awkward kinds per mode and exit")
    p.add_argument(
        "--late-minutes",
        type=lambda s: tuple(float(x) for x in s.split(":")),
        default=(2.0, 15.0),
        metavar="MIN:MAX",
        help="how far in the past late events are (default: 2:15)",
    )
    p.add_argument("--dsn", help="PostgreSQL DSN (default: the local stack's)")
    p.add_argument("--no-db", action="store_true", help="kafka-json without PostgreSQL: in-memory content")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default: the local stack's)")
    p.add_argument("--topic", default="engagement.events.json", help="topic for kafka-json and fuzz")
    p.add_argument("--partitions", type=int, default=3, help="partitions if the topic has to be created")
    p.add_argument("--manifest", type=Path, help="JSON-lines log of every record and its kind")
    p.add_argument("--commit-log", type=Path, help="JSON-lines log: first_id, last_id, committed_at per batch")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def options_from_args(argv: Sequence[str] | None = None) -> Options | None:
    """Parsed options, or None when the command only listed something."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_kinds:
        for mode in MODES:
            print(f"{mode}: {', '.join(k.value for k in kinds_for_mode(mode))}")
        return None
    if len(args.late_minutes) != 2 or not 0 <= args.late_minutes[0] <= args.late_minutes[1]:
        parser.error("--late-minutes needs MIN:MAX with 0 <= MIN <= MAX")
    if args.count is not None and args.count < 0:
        parser.error("--count must not be negative")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.content < 1:
        parser.error("--content must be at least 1")
    if args.no_db and args.mode == "postgres":
        parser.error("--no-db only applies to kafka-json mode")
    if args.mode == "fuzz" and not args.awkward and not args.case:
        args.awkward = 0.1  # fuzz mode exists for its poison; without a share it would send valid events only
    try:
        mix = parse_mix(
            args.mode,
            args.awkward,
            args.awkward_kinds if args.awkward else (),
            dict(args.case),
            with_db=not args.no_db,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return Options(
        mode=args.mode,
        rate=args.rate,
        duration=args.duration,
        count=args.count,
        content=args.content,
        users=max(1, args.users),
        seed=args.seed,
        batch_size=args.batch_size,
        mix=mix,
        late_minutes=args.late_minutes,
        dsn=args.dsn,
        no_db=args.no_db,
        bootstrap=args.bootstrap,
        topic=args.topic,
        partitions=args.partitions,
        manifest=args.manifest,
        commit_log=args.commit_log,
        quiet=args.quiet,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = options_from_args(argv)
    if opts is None:
        return 0
    try:
        summary = run(opts)
    except GeneratorError as exc:
        print(f"generator: {exc}", file=sys.stderr)
        return 2
    print(summary.as_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
