"""Restarting the streaming job without losing or double-counting events (SPEC §4).

A restarted job is a new job: its de-duplication state and its open windows are gone. Committed Kafka offsets
alone cannot say where to resume, because a local runner's consumer commits what it has *polled*, which is
ahead of what reached the sinks (docs/local-streaming.md), and because a window's total needs all of its
events, also those read before the stop. So ``--start_offset=resume`` plans the restart from what the
sinks hold:

1. **Where to read from.** The newest ``processed_at`` in ``enriched_events`` is where the last run had got
   to. Every record committed to Kafka more than ``margin`` before it had reached the sinks. The job
   re-reads from that point minus a window, its allowed lateness and the margin, aligned down to a window
   start: ``read_from``.
2. **Windows.** Windows starting at or after ``read_from`` are recomputed from all of their events (each
   event is committed after its window starts, and no later than the window's end plus the lateness), so
   their panes overwrite what the last run wrote with complete totals. Older windows were final before the
   last run stopped and get nothing from the re-read: ``KeepResumableWindows`` keeps their events out of
   the aggregation.
3. **Events.** A re-read event that a sink already holds is not written to it again: ``enriched_events``
   ids with ``processed_at >= read_from`` for BigQuery; for the external API, the events of the batches its
   intent log recorded since ``read_from``, which are sent again as they were, with their own keys
   (transforms/sinks/http_intents.py): the re-read would put those events in new batches, with keys the API
   has never seen. Both id sets cover only the overlap, so they are small; each worker loads them once, in
   ``setup()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.bigquery_reads import BigQueryReadSettings, Query, bigquery_client, run_query
from transforms.lists import per_item
from transforms.model import EnrichedEvent

METRICS_NAMESPACE = "resume"
DEFAULT_MARGIN_SECONDS = 60

_log = logging.getLogger(__name__)


# --- pure rules ------------------------------------------------------------------------------------------


def align_down(moment: datetime, window_seconds: int) -> datetime:
    """The start of the epoch-aligned fixed window holding ``moment`` (Beam's ``FixedWindows`` alignment)."""
    seconds = int(moment.timestamp() // window_seconds) * window_seconds
    return datetime.fromtimestamp(seconds, tz=UTC)


def resume_point(
    last_processed_at: datetime, window_seconds: int, allowed_lateness_seconds: int, margin_seconds: int
) -> datetime:
    """Where a restarted job re-reads Kafka from: see the module docstring, point 1."""
    if margin_seconds < 0:
        raise ValueError("the resume margin must not be negative")
    back = timedelta(seconds=window_seconds + allowed_lateness_seconds + margin_seconds)
    return align_down(last_processed_at - back, window_seconds)


def intents_since(read_from: datetime, last_processed_at: datetime, retry_budget_seconds: float) -> datetime:
    """Where a resume's replay of the HTTP sink's recorded batches starts: at the re-read's start, or earlier
    when a batch recorded before it could still have been waiting for a retry as the last run stopped (it
    would then be neither re-read nor replayed). The last run stopped no earlier than ``last_processed_at``,
    and a batch waits at most its retry budget after it is recorded; the margin absorbs clock skew. Replaying
    a batch the API already has costs one request, answered as a replay."""
    waited_from = last_processed_at - timedelta(seconds=retry_budget_seconds + DEFAULT_MARGIN_SECONDS)
    return min(read_from, waited_from)


@dataclass(frozen=True)
class ResumePlan:
    """The decisions of one restart, fixed when the job is launched and shipped with it."""

    read_from: datetime
    last_processed_at: datetime

    def describe(self) -> str:
        return (
            f"resuming: the last run wrote events until {self.last_processed_at.isoformat()}; re-reading Kafka "
            f"from {self.read_from.isoformat()}, recomputing windows from there, skipping events the sinks hold"
        )


# --- transforms -------------------------------------------------------------------------------------------


class KeepResumableWindows(beam.PTransform):
    """Drops, before aggregation, events of windows that started before ``read_from`` (point 2)."""

    def __init__(self, read_from: datetime, event_lists: bool = False) -> None:
        """``event_lists``: the input holds lists of events, and so does the output (``transforms/lists.py``)."""
        super().__init__()
        self._read_from = read_from
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> beam.PCollection[EnrichedEvent]:
        keep = per_item(_KeepFromFn(self._read_from), self._event_lists)
        return events | "Windows from the resume point" >> beam.ParDo(keep)


class _KeepFromFn(beam.DoFn):
    def __init__(self, read_from: datetime) -> None:
        self._read_from = read_from
        self._kept_out = Metrics.counter(METRICS_NAMESPACE, "events_of_final_windows")

    def process(self, event: EnrichedEvent) -> Iterator[EnrichedEvent]:
        if event.event.event_ts >= self._read_from:
            yield event
        else:
            self._kept_out.inc()


IdLoader = Callable[[], frozenset[int]]
"""Loads the ids a sink already holds for the overlap; called once per worker, in ``setup()``."""


class SkipDelivered(beam.PTransform):
    """Drops events a sink already holds (point 3), counting them under ``<sink>_already_delivered``."""

    def __init__(self, sink: str, load_ids: IdLoader, event_lists: bool = False) -> None:
        """``event_lists``: the input holds lists of events, and so does the output (``transforms/lists.py``)."""
        super().__init__()
        self._sink = sink
        self._load_ids = load_ids
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> beam.PCollection[EnrichedEvent]:
        skip = per_item(_SkipDeliveredFn(self._sink, self._load_ids), self._event_lists)
        return events | f"Skip events {self._sink} holds" >> beam.ParDo(skip)


class _SkipDeliveredFn(beam.DoFn):
    def __init__(self, sink: str, load_ids: IdLoader) -> None:
        self._sink = sink
        self._load_ids = load_ids
        self._ids: frozenset[int] = frozenset()
        self._skipped = Metrics.counter(METRICS_NAMESPACE, f"{sink}_already_delivered")

    def setup(self) -> None:
        self._ids = self._load_ids()
        _log.info("resume: %s already holds %d events of the overlap", self._sink, len(self._ids))

    def process(self, event: EnrichedEvent) -> Iterator[EnrichedEvent]:
        if event.event.id in self._ids:
            self._skipped.inc()
        else:
            yield event


# --- what the sinks hold ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigQueryProgress:
    """Reads ``enriched_events``: where the last run got to, and the ids it wrote since a moment."""

    settings: BigQueryReadSettings

    def last_processed_at(self) -> datetime | None:
        table = self.settings.table_id(self.settings.events_table)
        client = bigquery_client(self.settings)
        try:
            rows = list(run_query(client, Query(f"SELECT MAX(processed_at) AS last FROM `{table}`", ())))  # noqa: S608
        finally:
            client.close()
        last = rows[0]["last"] if rows else None
        return last.astimezone(UTC) if last is not None else None


@dataclass(frozen=True)
class BigQueryIdsSince:
    """An ``IdLoader``: the ids ``enriched_events`` got from ``since`` on (processing time)."""

    settings: BigQueryReadSettings
    since: datetime

    def __call__(self) -> frozenset[int]:
        table = self.settings.table_id(self.settings.events_table)
        query = Query(
            f"SELECT DISTINCT event_id FROM `{table}` WHERE processed_at >= @since",  # noqa: S608
            (("since", self.since),),
        )
        client = bigquery_client(self.settings)
        try:
            return frozenset(row["event_id"] for row in run_query(client, query))
        finally:
            client.close()


class LastProcessedAt(Protocol):
    """Where the last run got to: the newest ``processed_at`` of what it wrote, or None before any run."""

    def last_processed_at(self) -> datetime | None: ...


def plan_resume(
    progress: LastProcessedAt, window_seconds: int, allowed_lateness_seconds: int, margin_seconds: int
) -> ResumePlan | None:
    """The restart's plan, or None when ``enriched_events`` is empty (nothing to resume: a first run)."""
    last = progress.last_processed_at()
    if last is None:
        return None
    return ResumePlan(
        read_from=resume_point(last, window_seconds, allowed_lateness_seconds, margin_seconds),
        last_processed_at=last,
    )


class ResumeOptions(PipelineOptions):
    """Options of a restart with ``--start_offset=resume``."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--resume_margin_seconds",
            type=int,
            default=DEFAULT_MARGIN_SECONDS,
            help=(
                "With --start_offset=resume: how far behind its newest BigQuery row the last run may have been "
                "in reading Kafka, in seconds. The re-read starts this much earlier, plus a window and its "
                "allowed lateness."
            ),
        )
        parser.add_argument(
            "--resume_max_gap_seconds",
            type=int,
            default=900,
            help=(
                "With --start_offset=resume: the longest stop that is caught up by re-reading Kafka, in seconds. "
                "After a longer one (or on a first run) the job starts with the windows still open and logs the "
                "scripts/backfill command that fills the gap: batch is much faster at history than the stream."
            ),
        )
