"""Short reads of PostgreSQL: one query on a connection of its own, closed whatever happens.

The checks and counts made before a pipeline starts (tables, columns, a range's rows) and the content
snapshot use it; the long-lived connections of the DoFns (the content lookup, the backfill's reader) are
opened in their ``setup()`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transforms.secrets import SecretSource, read_cached


@dataclass(frozen=True)
class PostgresDsn:
    """A libpq connection string and, apart from it, where the password is read (transforms/secrets.py).

    The password of ``password`` is read by whoever connects (a worker, the launcher's checks), never stored
    here, so the connection travels in the job graph without it. ``dsn`` may still hold a password of its own
    (the local stack's default does); ``pipelines.options.postgres_from_options`` refuses that on Dataflow.
    Without either, libpq's own sources apply (``PGPASSWORD``, ``~/.pgpass``)."""

    dsn: str
    password: SecretSource | None = None

    def __repr__(self) -> str:
        # Plans and settings that hold this may be logged; a DSN's own password must not be.
        return f"PostgresDsn({without_password(self.dsn)!r}, password={self.password!r})"

    def connect(self, **kwargs: Any) -> Any:
        import psycopg2  # imported where a connection is made, so the pure layers do not need the driver

        if self.password is not None:
            kwargs["password"] = read_cached(self.password).reveal()
        return psycopg2.connect(self.dsn, **kwargs)


def as_postgres(dsn: str | PostgresDsn) -> PostgresDsn:
    """Callers may pass a plain connection string (tests, local scripts)."""
    return dsn if isinstance(dsn, PostgresDsn) else PostgresDsn(dsn)


def dsn_has_password(dsn: str) -> bool:
    from psycopg2.extensions import parse_dsn

    return bool(parse_dsn(dsn).get("password"))


def without_password(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***``, for messages; an unparseable DSN is not shown at all."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import make_dsn, parse_dsn

    try:
        settings = parse_dsn(dsn)
    except ProgrammingError:
        return "<unparseable DSN>"
    if "password" in settings:
        settings["password"] = "***"  # noqa: S105 - a placeholder
    return make_dsn(**settings)


def fetch_all(
    dsn: str | PostgresDsn,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] = (),
    connect_timeout_seconds: int | None = None,
) -> list[tuple[Any, ...]]:
    """The rows of ``sql``; psycopg2's errors propagate (libpq's messages name host and port, never a password)."""
    connection = as_postgres(dsn).connect(connect_timeout=connect_timeout_seconds)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        connection.close()
