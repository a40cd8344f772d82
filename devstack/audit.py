"""Audits every sink exactly against PostgreSQL, the source of truth, for a set of event ids.

What each sink should hold is computed here in SQL from ``engagement_events`` and ``content``, never with the
pipeline's own code, so a wrong rule in the pipeline cannot hide itself. Used by ``scripts/faults`` after each
fault and by the end-to-end restart test (tests/integration/test_streaming_end_to_end.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from transforms.sinks.redis_layout import RedisKeys, from_score

GROUND_TRUTH_SQL = """
SELECT to_timestamp(floor(extract(epoch FROM e.event_ts) / %(window)s) * %(window)s) AS window_start,
       e.content_id::text AS content_id,
       c.id IS NULL AS content_missing,
       count(*) AS event_count,
       count(*) FILTER (WHERE e.event_type = 'play') AS play_count,
       count(*) FILTER (WHERE e.event_type = 'pause') AS pause_count,
       count(*) FILTER (WHERE e.event_type = 'finish') AS finish_count,
       count(*) FILTER (WHERE e.event_type = 'click') AS click_count,
       coalesce(sum(e.duration_ms) FILTER (WHERE e.duration_ms >= 0), 0) / 1000.0 AS engagement_seconds_sum,
       count(DISTINCT e.user_id) AS distinct_users
FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id
WHERE e.id = ANY(%(ids)s)
GROUP BY 1, 2, 3
"""

VALUE_COLUMNS = ("event_count", "play_count", "pause_count", "finish_count", "click_count", "distinct_users")

WindowKey = tuple[datetime, str | None, bool]
"""(window start, content id, content missing)."""


def ground_truth(conn, ids: list[int], window_seconds: int) -> dict[WindowKey, dict]:  # noqa: ANN001 - psycopg2
    """Per window and content: the aggregate SPEC §5 defines, from PostgreSQL."""
    with conn.cursor() as cursor:
        cursor.execute(GROUND_TRUTH_SQL, {"window": window_seconds, "ids": ids})
        names = [column.name for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    return {(row["window_start"].astimezone(UTC), row["content_id"], row["content_missing"]): row for row in rows}


def diff(actual: dict, expected: dict, limit: int = 20) -> str:
    """'' when equal; otherwise the differing keys, for a failure message."""
    lines = [
        f"{key}: actual {actual.get(key)} expected {expected.get(key)}"
        for key in sorted(set(actual) | set(expected), key=str)
        if actual.get(key) != expected.get(key)
    ]
    return "\n".join(lines[:limit]) + (f"\n... {len(lines)} differences" if lines else "")


def differences(actual: dict, expected: dict) -> int:
    return sum(1 for key in set(actual) | set(expected) if actual.get(key) != expected.get(key))


def comparable(truth: dict[WindowKey, dict]) -> dict:
    """The truth per window and content id. Events without a content id are left out: other writers' events
    would land in the same NULL group; they are checked one by one in ``enriched_events`` instead."""
    return {
        key: (*(int(row[c]) for c in VALUE_COLUMNS), Decimal(row["engagement_seconds_sum"]).quantize(Decimal("0.001")))
        for key, row in truth.items()
        if key[1] is not None
    }


def bigquery_rows(bq, table_prefix: str, sql: str) -> list[dict]:  # noqa: ANN001 - google.cloud.bigquery.Client
    """Runs ``sql`` with "`DATASET." standing for ``table_prefix`` ("project.dataset")."""
    return [dict(row) for row in bq.query_and_wait(sql.replace("`DATASET.", f"`{table_prefix}."))]


def current_aggregates(bq, table_prefix: str, truth: dict[WindowKey, dict]) -> dict:  # noqa: ANN001
    """``window_aggregates_current`` for the truth's content, in ``comparable``'s shape."""
    contents = {content_id for (_, content_id, _) in truth if content_id is not None}
    if not contents:
        return {}
    listed = ",".join(f"'{content_id}'" for content_id in contents)
    rows = bigquery_rows(
        bq,
        table_prefix,
        f"SELECT * FROM `DATASET.window_aggregates_current` WHERE content_id IN ({listed})",  # noqa: S608
    )
    return {
        (row["window_start"].astimezone(UTC), row["content_id"], row["content_missing"]): (
            *(int(row[c]) for c in VALUE_COLUMNS),
            Decimal(row["engagement_seconds_sum"]).quantize(Decimal("0.001")),
        )
        for row in rows
    }


def ranked_buckets(truth: dict[WindowKey, dict]) -> dict:
    """(window start, content) -> (engagement seconds, events) for content that ranks (SPEC §3)."""
    return {
        (int(window.timestamp()), content_id): (
            Decimal(row["engagement_seconds_sum"]).quantize(Decimal("0.001")),
            int(row["event_count"]),
        )
        for (window, content_id, missing), row in truth.items()
        if not missing
    }


def redis_buckets(cache: redis.Redis, prefix: str, truth: dict[WindowKey, dict]) -> dict:
    """What the Redis buckets of the truth's windows hold for the truth's content, in ``ranked_buckets``' shape."""
    keys = RedisKeys(prefix)
    mine = {content_id for (_, content_id, missing) in truth if not missing}
    found = {}
    for window in {int(window.timestamp()) for (window, _, _) in truth}:
        seconds = dict(cache.zrange(keys.bucket(window), 0, -1, withscores=True))
        events = dict(cache.zrange(keys.bucket_events(window), 0, -1, withscores=True))
        for member, score in seconds.items():
            content_id = member.decode()
            if content_id in mine:
                found[(window, content_id)] = (from_score(score), int(events.get(member, 0)))
    return found


def receipt_counts(stored: dict, ids: Iterable[int]) -> dict[int, int]:
    """How many times the stand-in HTTP API stored each of ``ids`` (0 if never), from its ``/v1/events/ids``."""
    counts = dict.fromkeys(ids, 0)
    for event_id in stored["ids"]:
        if event_id in counts:
            counts[event_id] = 1
    for duplicate in stored["duplicates"]:
        if duplicate["id"] in counts:
            counts[duplicate["id"]] = duplicate["count"]
    return counts


def id_copies(bq, table_prefix: str, ids: Iterable[int]) -> Counter:  # noqa: ANN001
    """How many rows of the raw ``enriched_events`` table each id has (0 for the ids it lacks)."""
    wanted = sorted(ids)
    copies: Counter = Counter(dict.fromkeys(wanted, 0))
    for start in range(0, len(wanted), 5_000):
        chunk = ",".join(map(str, wanted[start : start + 5_000]))
        sql = f"SELECT event_id, COUNT(*) AS n FROM `DATASET.enriched_events` WHERE event_id IN ({chunk}) GROUP BY 1"  # noqa: S608
        for row in bigquery_rows(bq, table_prefix, sql):
            copies[row["event_id"]] = row["n"]
    return copies


@dataclass(frozen=True)
class SinkAudit:
    """One sink's verdict for a set of ids: ids missing, ids held more than once; rows that differ from the truth."""

    lost: int = 0
    doubled: int = 0
    wrong: int = 0

    @property
    def exact(self) -> bool:
        return self.lost == self.doubled == self.wrong == 0


def copies_audit(copies: Counter) -> SinkAudit:
    return SinkAudit(lost=sum(1 for n in copies.values() if n == 0), doubled=sum(1 for n in copies.values() if n > 1))


@dataclass(frozen=True)
class Audit:
    bigquery_events: SinkAudit
    http: SinkAudit
    aggregates: SinkAudit
    redis: SinkAudit
    dead_letters: int
    examples: str = ""
    """A few of the differing windows, actual against expected, for a report."""

    @property
    def exact(self) -> bool:
        return all(s.exact for s in (self.bigquery_events, self.http, self.aggregates, self.redis))


def audit_sinks(
    conn,  # noqa: ANN001 - psycopg2 connection
    bq,  # noqa: ANN001 - google.cloud.bigquery.Client
    table_prefix: str,
    cache: redis.Redis,
    redis_prefix: str,
    receipts: dict[int, int],
    ids: list[int],
    window_seconds: int,
) -> Audit:
    """Every sink against PostgreSQL for ``ids``; ``receipts`` is the HTTP API's count per id."""
    truth = ground_truth(conn, ids, window_seconds)
    expected_aggregates = comparable(truth)
    expected_buckets = ranked_buckets(truth)
    listed = ",".join(map(str, ids)) or "NULL"
    dead = bigquery_rows(
        bq,
        table_prefix,
        f"SELECT COUNT(*) AS n FROM `DATASET.dead_letters` WHERE event_id IN ({listed})",  # noqa: S608
    )
    aggregates = current_aggregates(bq, table_prefix, truth)
    buckets = redis_buckets(cache, redis_prefix, truth)
    return Audit(
        bigquery_events=copies_audit(id_copies(bq, table_prefix, ids)),
        http=copies_audit(Counter({i: receipts.get(i, 0) for i in ids})),
        aggregates=SinkAudit(wrong=differences(aggregates, expected_aggregates)),
        redis=SinkAudit(wrong=differences(buckets, expected_buckets)),
        dead_letters=int(dead[0]["n"]),
        examples="\n".join(
            part
            for part in (diff(aggregates, expected_aggregates, limit=3), diff(buckets, expected_buckets, limit=3))
            if part
        ),
    )


def wait_until_exact(audit: Any, timeout: float, interval: float = 3.0) -> tuple[Audit, float | None]:
    """Calls ``audit()`` until it is exact or ``timeout`` passes: (the last audit, seconds it took or None)."""
    started = time.monotonic()
    while True:
        result = audit()
        if result.exact:
            return result, time.monotonic() - started
        if time.monotonic() - started > timeout:
            return result, None
        time.sleep(interval)
