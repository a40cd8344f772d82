"""Checks run before a pipeline starts, so a wrong setting fails at once with one clear line."""

from __future__ import annotations


class PreflightError(RuntimeError):
    """A setting or a service the pipeline needs is wrong or missing; the message says which."""


def check_postgres(dsn: str, tables: tuple[str, ...] = ("content", "engagement_events")) -> None:
    """PostgreSQL is reachable with ``dsn`` and holds ``tables``."""
    import psycopg2

    try:
        connection = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"cannot connect to PostgreSQL ({first_line})") from exc
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT name FROM unnest(%s::text[]) AS t(name) WHERE to_regclass(name) IS NULL", (list(tables),)
            )
            missing = [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()
    if missing:
        raise PreflightError(f"PostgreSQL has no table {', '.join(missing)}; apply sql/postgres/*.sql first")
