"""Short reads of PostgreSQL: one query on a connection of its own, closed whatever happens.

The checks and counts made before a pipeline starts (tables, columns, a range's rows) and the content
snapshot use it; the long-lived connections of the DoFns (the content lookup, the backfill's reader) are
opened in their ``setup()`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def fetch_all(
    dsn: str,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
    connect_timeout_seconds: int | None = None,
) -> list[tuple[Any, ...]]:
    """The rows of ``sql``; psycopg2's errors propagate (libpq's messages name host and port, never a password)."""
    import psycopg2  # imported where the query runs, so the pure layers do not need the driver

    connection = psycopg2.connect(dsn, connect_timeout=connect_timeout_seconds)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()
