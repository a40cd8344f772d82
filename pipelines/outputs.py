"""Fans the core outputs out to the three sinks and gathers every dead letter into one table.

enriched events  -> BigQuery enriched_events, external HTTP API (if enabled)
window aggregates -> BigQuery window_aggregates, Redis top content
dead letters (decode, and every sink's undeliverable records) -> BigQuery dead_letters
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.core import CoreOutputs
from transforms.dead_letters import flatten_dead_letters
from transforms.lists import per_item
from transforms.model import DeadLetter, EnrichedEvent
from transforms.resume import IdLoader, SkipDelivered
from transforms.sinks.bigquery import (
    BigQuerySinkSettings,
    WriteDeadLetters,
    WriteEnrichedEvents,
    WriteWindowAggregates,
)
from transforms.sinks.http_api import HttpSinkSettings, WriteToHttpApi
from transforms.sinks.redis_top import RedisSinkSettings, WriteTopContentToRedis


@dataclass(frozen=True)
class SinkSettings:
    bigquery: BigQuerySinkSettings
    redis: RedisSinkSettings
    http: HttpSinkSettings | None
    """None when the HTTP sink is disabled (the backfill's default)."""
    bigquery_holds: IdLoader | None = None
    http_holds: IdLoader | None = None
    """For a resumed job: the ids each sink already holds from the overlap (transforms/resume.py)."""

    @classmethod
    def from_options(cls, options: PipelineOptions, window_seconds: int) -> SinkSettings:
        return cls(
            bigquery=BigQuerySinkSettings.from_options(options),
            redis=RedisSinkSettings.from_options(options, window_seconds=window_seconds),
            http=HttpSinkSettings.from_options(options),
        )


class CountDeadLettersFn(beam.DoFn):
    """One counter per stage, so a dashboard shows where records fail without querying the table."""

    def __init__(self) -> None:
        self._counters: dict[str, Metrics.DelegatingCounter] = {}

    def process(self, dead_letter: DeadLetter):  # noqa: ANN201 - Beam generator
        stage = dead_letter.stage.value
        if stage not in self._counters:
            self._counters[stage] = Metrics.counter("dead_letters", stage)
        self._counters[stage].inc()
        yield dead_letter


class ObserveFreshnessFn(beam.DoFn):
    """Passes events on, measuring how long each took from its PostgreSQL commit to this sink's input.

    ``sink.<name>/commit_to_sink_ms`` in the job's metrics (the Redis sink measures at its write instead:
    ``sink.redis/commit_to_write_ms``). Events without a commit time (plain JSON, the backfill) are not measured.
    """

    def __init__(self, sink: str) -> None:
        self._latency = Metrics.distribution(f"sink.{sink}", "commit_to_sink_ms")

    def process(self, enriched: EnrichedEvent) -> Iterator[EnrichedEvent]:
        committed = enriched.event.committed_at_ms
        if committed is not None:
            self._latency.update(int(time.time() * 1000) - committed)
        yield enriched


def write_outputs(core: CoreOutputs, sinks: SinkSettings) -> beam.PCollection[DeadLetter]:
    """Writes every output; returns the dead letters the dead-letter table itself refused (logged).

    ``core.enriched`` may hold lists of events (``core.enriched_lists``, ``transforms/lists.py``)."""
    lists = core.enriched_lists
    dead_letters = [core.dead_letters]
    to_bigquery = core.enriched | "Freshness at BigQuery" >> beam.ParDo(per_item(ObserveFreshnessFn("bigquery"), lists))
    if sinks.bigquery_holds is not None:
        to_bigquery = to_bigquery | "Resume BigQuery" >> SkipDelivered("bigquery", sinks.bigquery_holds, lists)
    dead_letters.append(
        to_bigquery | "BigQuery enriched_events" >> WriteEnrichedEvents(sinks.bigquery, event_lists=lists)
    )
    # The core coalesces the panes where it adds them up (streaming); WriteWindowAggregates writes what it gets.
    to_window_aggregates = core.aggregates if core.coalesced_aggregates is None else core.coalesced_aggregates
    dead_letters.append(to_window_aggregates | "BigQuery window_aggregates" >> WriteWindowAggregates(sinks.bigquery))
    dead_letters.append(core.aggregates | "Redis top content" >> WriteTopContentToRedis(sinks.redis))
    if sinks.http is not None:
        to_http = core.enriched | "Freshness at the HTTP API" >> beam.ParDo(per_item(ObserveFreshnessFn("http"), lists))
        if sinks.http_holds is not None:
            to_http = to_http | "Resume HTTP" >> SkipDelivered("http", sinks.http_holds, lists)
        dead_letters.append(to_http | "External HTTP API" >> WriteToHttpApi(sinks.http, event_lists=lists))
    return (
        flatten_dead_letters("All dead letters", *dead_letters)
        | "Count dead letters" >> beam.ParDo(CountDeadLettersFn())
        | "BigQuery dead_letters" >> WriteDeadLetters(sinks.bigquery)
    )
