"""Reading what the BigQuery tables hold: the one home of the read settings, the client and queries.

Used by the backfill (which ids and window values the sinks already have, transforms/backfill_filters.py) and
by the streaming job's resume (where the last run got to, and what it wrote since, transforms/resume.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.sinks.bigquery import BigQuerySinkOptions, BigQuerySinkSettings


@dataclass(frozen=True)
class BigQueryReadSettings:
    """Where the sinks' current contents are read. ``rest_endpoint`` is the emulator's REST URL; None means
    Google's BigQuery with the worker's default credentials."""

    project: str
    dataset: str
    events_table: str
    aggregates_table: str
    rest_endpoint: str | None = None

    def table_id(self, table: str) -> str:
        return f"{self.project}.{self.dataset}.{table}"

    @classmethod
    def of_sink(cls, sink: BigQuerySinkSettings, rest_endpoint: str | None) -> BigQueryReadSettings:
        """The tables the BigQuery sink writes, read back."""
        return cls(
            project=sink.project,
            dataset=sink.dataset,
            events_table=sink.events_table,
            aggregates_table=sink.aggregates_table,
            rest_endpoint=rest_endpoint,
        )

    @classmethod
    def from_options(cls, options: PipelineOptions) -> BigQueryReadSettings:
        return cls.of_sink(
            BigQuerySinkSettings.from_options(options), options.view_as(BigQuerySinkOptions).bigquery_rest_endpoint
        )


def bigquery_client(settings: BigQueryReadSettings) -> Any:
    from google.cloud import bigquery

    if settings.rest_endpoint is None:
        return bigquery.Client(project=settings.project)
    from google.auth.credentials import AnonymousCredentials

    return bigquery.Client(
        project=settings.project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": settings.rest_endpoint},
    )


@dataclass(frozen=True)
class Query:
    """Standard SQL with named TIMESTAMP parameters."""

    sql: str
    timestamps: tuple[tuple[str, datetime], ...]


def run_query(client: Any, query: Query, page_size: int | None = None) -> Iterator[dict[str, Any]]:
    """The query's rows as dicts, fetched page by page; its timestamps bound as query parameters."""
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter(name, "TIMESTAMP", value) for name, value in query.timestamps]
    )
    for row in client.query_and_wait(query.sql, job_config=config, page_size=page_size):
        yield dict(row)


class RunQueryFn(beam.DoFn):
    """Runs a query and yields its rows as dicts, page by page (memory stays flat for large results).

    Counts them as ``<metrics_namespace>/bigquery_rows_read``."""

    def __init__(self, settings: BigQueryReadSettings, metrics_namespace: str, page_size: int = 50_000) -> None:
        self._settings = settings
        self._page_size = page_size
        self._client = None
        self._rows_read = Metrics.counter(metrics_namespace, "bigquery_rows_read")

    def setup(self) -> None:
        self._client = bigquery_client(self._settings)

    def process(self, query: Query) -> Iterator[dict[str, Any]]:
        for row in run_query(self._client, query, self._page_size):
            self._rows_read.inc()
            yield row

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
