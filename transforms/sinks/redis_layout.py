"""How the top content lies in Redis: the keys, one bucket entry per (window, content), the ranking, and
reading it back. Pure rules, tested without Redis, shared by the sink that writes (``redis_top``), the
command-line reader (``redis_top_cli``) and the live view of ``scripts/run-local``. docs/redis.md documents
the keys, their types and TTLs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import redis

from transforms.model import WindowAggregate
from transforms.settings import setting

DEFAULT_PREFIX = "engagement"

_MILLIS = Decimal("0.001")


# --- Keys, buckets and ranking: pure rules, tested without Redis ------------------------------------


@dataclass(frozen=True)
class RedisKeys:
    """Every key the sink writes, under one configurable prefix (so deployments and tests can share a Redis).

    For Redis Cluster, use a hash tag as the prefix (``{engagement}``): the ranking unions several bucket
    keys in one command, which requires them to live in one slot.
    """

    prefix: str = setting(
        DEFAULT_PREFIX,
        flag="--redis_key_prefix",
        help=(
            "Prefix of every key the sink writes (<prefix>:bucket:..., <prefix>:top:10m, ...), so several "
            "deployments or test runs can share one Redis. Use a hash tag such as {engagement} on Redis "
            "Cluster."
        ),
    )

    def __post_init__(self) -> None:
        if not self.prefix or any(character.isspace() for character in self.prefix):
            raise ValueError(f"Redis key prefix must be non-empty and without whitespace, got {self.prefix!r}")

    def bucket(self, window_start: int) -> str:
        """ZSET content_id -> engagement_seconds_sum of the window starting at ``window_start`` (epoch s)."""
        return f"{self.prefix}:bucket:{window_start}"

    def bucket_events(self, window_start: int) -> str:
        """ZSET content_id -> event_count of the same window."""
        return f"{self.prefix}:bucket:{window_start}:events"

    def bucket_versions(self, window_start: int) -> str:
        """HASH content_id -> emitted_at (epoch µs) of the pane each bucket entry was written from."""
        return f"{self.prefix}:bucket:{window_start}:versions"

    def content(self, content_id: str) -> str:
        """HASH title, slug, content_type of one content item."""
        return f"{self.prefix}:content:{content_id}"

    def top(self, horizon_minutes: int) -> str:
        """ZSET content_id -> engagement seconds over the horizon, materialized for redis-cli."""
        return f"{self.prefix}:top:{horizon_minutes}m"

    def top_events(self, horizon_minutes: int) -> str:
        """ZSET content_id -> event count over the horizon, materialized with ``top``."""
        return f"{self.prefix}:top:{horizon_minutes}m:events"

    def meta(self) -> str:
        """HASH window_seconds, horizon_minutes: how a reader should cut buckets without being told."""
        return f"{self.prefix}:meta"

    def freshness(self) -> str:
        """LIST of "<written at ms> <commit-to-write ms>", newest first, at most FRESHNESS_SAMPLES: how long the
        events of recent writes took from their PostgreSQL commit to Redis (``read_freshness``)."""
        return f"{self.prefix}:freshness"


@dataclass(frozen=True)
class RankingSettings:
    """Which buckets make up "the last ``horizon_minutes`` minutes".

    Buckets are the pipeline's fixed windows (aligned to the epoch, as Beam's ``FixedWindows`` are). The
    ranking covers the ``horizon_minutes * 60 / window_seconds`` most recent windows up to now, the
    current, still-filling one included: with the default 60-second windows, the ten most recent
    one-minute buckets. The window length must divide the horizon, so the ranking never counts part
    of a window.
    """

    window_seconds: int = 60
    """The pipeline's ``--window_seconds``: the buckets are its windows."""
    horizon_minutes: int = setting(
        10,
        flag="--redis_ranking_horizon_minutes",
        type=int,
        help=(
            "Length of the ranking, in minutes: the top is computed over this many minutes of the most "
            "recent windows up to now. Must be a whole number of windows."
        ),
    )

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.horizon_minutes <= 0:
            raise ValueError("the ranking horizon must be positive")
        if self.horizon_seconds % self.window_seconds != 0:
            raise ValueError(
                f"window_seconds ({self.window_seconds}) must divide the ranking horizon "
                f"({self.horizon_minutes} min = {self.horizon_seconds} s) so it is made of whole windows"
            )

    @property
    def horizon_seconds(self) -> int:
        return self.horizon_minutes * 60

    @property
    def bucket_count(self) -> int:
        return self.horizon_seconds // self.window_seconds

    def current_bucket(self, now: float) -> int:
        return int(now // self.window_seconds) * self.window_seconds

    def bucket_starts(self, now: float) -> list[int]:
        """Window starts (epoch seconds) of the ranked buckets, newest first."""
        current = self.current_bucket(now)
        return [current - index * self.window_seconds for index in range(self.bucket_count)]


def bucket_start(aggregate: WindowAggregate) -> int:
    """The epoch second a bucket is named by: its window's start."""
    return int(aggregate.window_start.timestamp())


def window_length(aggregate: WindowAggregate) -> float:
    return (aggregate.window_end - aggregate.window_start).total_seconds()


def is_ranked(aggregate: WindowAggregate) -> bool:
    """SPEC §3: rows of missing or unknown content never count towards per-content rankings."""
    return not aggregate.content_missing and aggregate.content_id is not None


def bucket_expires_at(window_start: int, bucket_ttl_seconds: int) -> int:
    """Buckets expire relative to their window, not to the write.

    A replay or a backfill therefore sets the same expiry as the first write, and a pane for a window long
    gone cannot resurrect its bucket.
    """
    return window_start + bucket_ttl_seconds


def content_expires_at(window_starts: Iterable[int], now: float, bucket_ttl_seconds: int) -> int:
    """Content metadata outlives every bucket that names it (a window may start after now, on a skewed clock)."""
    return max(int(now), *window_starts) + bucket_ttl_seconds


def to_score(engagement_seconds: Decimal) -> float:
    """A bucket score: seconds as a double, exact for 3 decimals well beyond any realistic total."""
    return float(engagement_seconds)


def from_score(score: float | str | bytes) -> Decimal:
    """The exact 3-decimal seconds a bucket score was written from."""
    if isinstance(score, bytes):
        score = score.decode()
    return Decimal(repr(score) if isinstance(score, float) else score).quantize(_MILLIS)


OVERWRITE_IF_NEWER = """
for i = 1, #ARGV, 4 do
  local member, version = ARGV[i], tonumber(ARGV[i + 3])
  local current = redis.call('HGET', KEYS[3], member)
  if not current or tonumber(current) <= version then
    redis.call('ZADD', KEYS[1], ARGV[i + 1], member)
    redis.call('ZADD', KEYS[2], ARGV[i + 2], member)
    redis.call('HSET', KEYS[3], member, ARGV[i + 3])
  end
end
return 0
"""
"""KEYS: bucket, bucket events, bucket versions; ARGV: (member, score, event count, version) per entry."""


def _version(aggregate: WindowAggregate) -> int:
    return int(aggregate.emitted_at.timestamp() * 1_000_000)


def bucket_entry(aggregate: WindowAggregate) -> list[Any]:
    """The ``OVERWRITE_IF_NEWER`` arguments of one aggregate: member, score, event count, version.

    The sink computes it for each element as it arrives, where a failure is that element's dead letter,
    and again when the batch is sent, where a failure would fail the whole batch.
    """
    return [
        str(aggregate.content_id),
        to_score(aggregate.engagement_seconds_sum),
        aggregate.event_count,
        _version(aggregate),
    ]


def latest_panes(aggregates: Iterable[WindowAggregate]) -> dict[tuple[int, str], WindowAggregate]:
    """The newest pane per (bucket, content): the one whose value a sequence of overwrites would leave.

    Panes of one window fire in order with increasing ``pane_index``; keeping the highest does not depend
    on the order elements happen to have inside a bundle.
    """
    latest: dict[tuple[int, str], WindowAggregate] = {}
    for aggregate in aggregates:
        key = (bucket_start(aggregate), str(aggregate.content_id))
        current = latest.get(key)
        if current is None or (aggregate.pane_index, aggregate.emitted_at) >= (
            current.pane_index,
            current.emitted_at,
        ):
            latest[key] = aggregate
    return latest


def rank(totals: Mapping[str, Decimal], n: int) -> list[tuple[str, Decimal]]:
    """The ``n`` highest totals, ties broken like ``ZREVRANGE`` (member, descending) so both views agree."""
    return sorted(totals.items(), key=lambda item: (item[1], item[0]), reverse=True)[:n]


FRESHNESS_SAMPLES = 2000
"""Samples kept in the freshness list: a few minutes' worth of writes at hundreds of panes a minute."""


def freshness_samples(panes: Iterable[WindowAggregate], written_at_ms: int) -> list[int]:
    """Commit-to-write milliseconds of each pane's longest-waiting event (panes without a commit time: none)."""
    return [written_at_ms - pane.oldest_commit_ms for pane in panes if pane.oldest_commit_ms is not None]


def read_freshness(client: redis.Redis, keys: RedisKeys, since_ms: int) -> list[int]:
    """Commit-to-write milliseconds of the writes since ``since_ms``, from the freshness list."""
    samples = []
    for entry in client.lrange(keys.freshness(), 0, FRESHNESS_SAMPLES - 1):
        written_at, latency = (int(part) for part in entry.split())
        if written_at < since_ms:
            break
        samples.append(latency)
    return samples


# --- Reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopEntry:
    """One line of the ranking."""

    rank: int
    content_id: str
    title: str | None
    slug: str | None
    content_type: str | None
    engagement_seconds: Decimal
    event_count: int


def _text(value: str | bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _metadata(fields: Mapping[Any, Any], name: str) -> str | None:
    value = _text(fields.get(name, fields.get(name.encode())))
    return value or None


def read_top_content(
    client: redis.Redis,
    prefix: str = DEFAULT_PREFIX,
    now: float | None = None,
    n: int = 10,
    ranking: RankingSettings | None = None,
) -> list[TopEntry]:
    """The current top ``n``, computed live from the buckets (not from the materialized key).

    Totals are summed in decimal, so they are exact to the millisecond; two round trips whatever ``n``.
    Works with clients with or without ``decode_responses``.
    """
    keys = RedisKeys(prefix)
    ranking = ranking or RankingSettings()
    starts = ranking.bucket_starts(time.time() if now is None else now)

    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.zrange(keys.bucket(start), 0, -1, withscores=True)
    totals: dict[str, Decimal] = {}
    for members in pipe.execute():
        for member, score in members:
            content_id = _text(member)
            assert content_id is not None
            totals[content_id] = totals.get(content_id, Decimal("0.000")) + from_score(score)
    top = rank(totals, n)
    if not top:
        return []

    ids = [content_id for content_id, _ in top]
    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.zmscore(keys.bucket_events(start), ids)
    for content_id in ids:
        pipe.hgetall(keys.content(content_id))
    replies = pipe.execute()
    counts = dict.fromkeys(ids, 0)
    for scores in replies[: len(starts)]:
        for content_id, count in zip(ids, scores, strict=True):
            counts[content_id] += int(count or 0)
    metadata = replies[len(starts) :]

    return [
        TopEntry(
            rank=position,
            content_id=content_id,
            title=_metadata(fields, "title"),
            slug=_metadata(fields, "slug"),
            content_type=_metadata(fields, "content_type"),
            engagement_seconds=seconds,
            event_count=counts[content_id],
        )
        for position, ((content_id, seconds), fields) in enumerate(zip(top, metadata, strict=True), start=1)
    ]


def read_ranking_settings(client: redis.Redis, prefix: str = DEFAULT_PREFIX) -> RankingSettings | None:
    """The window length and horizon the sink last wrote with, or None if it has not written yet."""
    fields = client.hgetall(RedisKeys(prefix).meta())
    window_seconds, horizon_minutes = _metadata(fields, "window_seconds"), _metadata(fields, "horizon_minutes")
    if window_seconds is None or horizon_minutes is None:
        return None
    return RankingSettings(window_seconds=int(window_seconds), horizon_minutes=int(horizon_minutes))
