"""The BigQuery tables as the sinks see them: each table's columns, in table order.

The one description both writers use: the production sink (``transforms/sinks/bigquery.py``, which reads it
from ``sql/bigquery/001_tables.sql``) and the local Storage Write writer (``bigquery_local.py``), which builds
its proto rows from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # BigQuery standard SQL type: INT64, STRING, NUMERIC, TIMESTAMP, BOOL, BYTES, ...
    required: bool = False


@dataclass(frozen=True)
class TableSpec:
    """A destination table and its columns, in table order."""

    project: str
    dataset: str
    table: str
    columns: tuple[Column, ...]

    @property
    def table_id(self) -> str:
        return f"{self.project}.{self.dataset}.{self.table}"
