"""Checks run before a pipeline starts, so a wrong setting fails at once with one clear line."""

from __future__ import annotations

from transforms.postgres import PostgresDsn
from transforms.postgres_source import missing_source_tables


class PreflightError(RuntimeError):
    """A setting or a service the pipeline needs is wrong or missing; the message is one line for the operator."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (libpq's span several), or its type when it has none."""
    return " ".join(str(error).split()) or type(error).__name__


def check_postgres(dsn: str | PostgresDsn, connect_timeout_seconds: int = 10) -> None:
    """PostgreSQL is reachable with ``dsn`` and holds the source tables."""
    import psycopg2

    try:
        missing = missing_source_tables(dsn, connect_timeout_seconds=connect_timeout_seconds)
    except psycopg2.Error as error:
        # libpq's message names host and port, never the password.
        raise PreflightError(f"cannot use PostgreSQL: {one_line(error)}") from error
    if missing:
        raise PreflightError(f"PostgreSQL has no table {', '.join(missing)} (apply sql/postgres/001_schema.sql)")
