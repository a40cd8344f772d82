"""What a backfill must not write again (SPEC §7: running the same backfill twice leaves every sink as
after the first run, and a backfill never duplicates what streaming wrote).

* ``enriched_events``: an event whose id is already in the table (for the range) is not written again.
  The existing ids are read from BigQuery inside the pipeline and joined with the events by id, which
  scales with the range on any runner (no id set is held in memory or shipped with the job).
* ``window_aggregates``: a window is written only when its value differs from the table's current
  value, the newest pane as ``window_aggregates_current`` defines it. Only the value columns are
  compared, never ``pane_timing``, ``pane_index`` or ``emitted_at``, so a re-run writes nothing and an
  overlap with streaming writes only corrections. The current values are few (windows x contents), so
  they travel as a side input and the aggregates keep their event-time windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from transforms.bigquery_reads import BigQueryReadSettings, Query, RunQueryFn
from transforms.lists import LIST_ROWS, items, per_item
from transforms.model import EnrichedEvent, WindowAggregate
from transforms.postgres_source import TimeRange
from transforms.rows import Row, window_aggregate_row

METRICS_NAMESPACE = "backfill"

WindowRowKey = tuple[datetime, str | None, bool]
"""(window_start, content_id, content_missing): the identity of a window's row, as the view partitions it.
``transforms.aggregate.AggregateKey`` is the same without the window, which Beam carries beside it."""

AGGREGATE_VALUE_COLUMNS = (
    "window_end",
    "title",
    "slug",
    "content_type",
    "event_count",
    "play_count",
    "pause_count",
    "finish_count",
    "click_count",
    "engagement_seconds_sum",
    "distinct_users",
)
"""The columns that make a window's value: everything but its identity and its pane's metadata."""


# --- pure rules --------------------------------------------------------------------------------------------


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def window_row_key(row: Mapping[str, Any]) -> WindowRowKey:
    content_id = row["content_id"]
    return _utc(row["window_start"]), str(content_id) if content_id is not None else None, bool(row["content_missing"])


def aggregate_value(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The value columns, normalized so a row read back from BigQuery equals the row that was written."""
    values = []
    for column in AGGREGATE_VALUE_COLUMNS:
        value = row[column]
        if isinstance(value, datetime):
            value = _utc(value)
        elif column == "engagement_seconds_sum" and value is not None:
            value = Decimal(value)  # NUMERIC: equal whatever its scale (1.5 == 1.500)
        values.append(value)
    return tuple(values)


def aggregate_changed(computed: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether a window's computed row must be written: it is new, or its value differs from the table's."""
    return current is None or aggregate_value(computed) != aggregate_value(current)


def window_range(time_range: TimeRange, window_seconds: int) -> tuple[datetime, datetime]:
    """``[first window start, end)``: the starts of every fixed window that holds part of the range."""
    start = int(time_range.start.timestamp())
    first = start - start % window_seconds
    return datetime.fromtimestamp(first, UTC), time_range.end


def check_window_aligned(time_range: TimeRange, window_seconds: int) -> None:
    """A range must cover whole windows: a window computed from part of its events would overwrite the
    table's (and Redis') complete value with a smaller one."""
    for flag, instant in (("--start", time_range.start), ("--end", time_range.end)):
        if instant.timestamp() % window_seconds != 0:
            aligned = datetime.fromtimestamp(instant.timestamp() - instant.timestamp() % window_seconds, UTC)
            raise ValueError(
                f"{flag} {instant.isoformat()} is not on a {window_seconds}-second window boundary "
                f"(e.g. {aligned.isoformat()}); a partial window would overwrite its complete value"
            )


# --- reading what BigQuery holds ---------------------------------------------------------------------------


def existing_ids_query(settings: BigQueryReadSettings, time_range: TimeRange) -> Query:
    # The event_ts filter prunes the table's DATE(event_ts) partitions.
    table = settings.table_id(settings.events_table)
    return Query(
        f"SELECT DISTINCT event_id FROM `{table}` WHERE event_ts >= @start AND event_ts < @end",  # noqa: S608
        (("start", time_range.start), ("end", time_range.end)),
    )


def current_aggregates_query(settings: BigQueryReadSettings, time_range: TimeRange, window_seconds: int) -> Query:
    # The newest pane per window, ranked as the window_aggregates_current view ranks it; written against the
    # table so a renamed --bigquery_aggregates_table works without its view.
    table = settings.table_id(settings.aggregates_table)
    first, end = window_range(time_range, window_seconds)
    return Query(
        "SELECT * EXCEPT (pane_rank) FROM ("  # noqa: S608 - identifiers from options, values as parameters
        " SELECT *, ROW_NUMBER() OVER (PARTITION BY window_start, content_id, content_missing"
        " ORDER BY emitted_at DESC, pane_index DESC) AS pane_rank"
        f" FROM `{table}` WHERE window_start >= @start AND window_start < @end"
        ") WHERE pane_rank = 1",
        (("start", first), ("end", end)),
    )


class ReadExistingEventIds(beam.PTransform):
    """The ids ``enriched_events`` already holds for the range."""

    def __init__(self, settings: BigQueryReadSettings, time_range: TimeRange) -> None:
        super().__init__()
        self._settings = settings
        self._time_range = time_range

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[int]:
        return (
            begin
            | "Query" >> beam.Create([existing_ids_query(self._settings, self._time_range)])
            | "Run" >> beam.ParDo(RunQueryFn(self._settings, METRICS_NAMESPACE))
            | "Ids" >> beam.Map(lambda row: row["event_id"])
        )


class ReadCurrentAggregates(beam.PTransform):
    """The current row of every window of the range that ``window_aggregates`` holds, keyed by identity."""

    def __init__(self, settings: BigQueryReadSettings, time_range: TimeRange, window_seconds: int) -> None:
        super().__init__()
        self._settings = settings
        self._time_range = time_range
        self._window_seconds = window_seconds

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[tuple[WindowRowKey, Row]]:
        query = current_aggregates_query(self._settings, self._time_range, self._window_seconds)
        return (
            begin
            | "Query" >> beam.Create([query])
            | "Run" >> beam.ParDo(RunQueryFn(self._settings, METRICS_NAMESPACE))
            | "Key" >> beam.Map(lambda row: (window_row_key(row), row))
        )


# --- the filters -------------------------------------------------------------------------------------------


class _KeepUnwrittenFn(beam.DoFn):
    def __init__(self) -> None:
        self._new = Metrics.counter(METRICS_NAMESPACE, "events_new")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "events_already_in_bigquery")

    def process(self, joined: tuple[int, dict[str, Iterable[Any]]]) -> Iterator[EnrichedEvent]:
        _, groups = joined
        events = list(groups["events"])
        if any(True for _ in groups["existing"]):
            self._skipped.inc(len(events))
            return
        self._new.inc(len(events))
        yield from events


class _SkipKnownIdsFn(beam.DoFn):
    def __init__(self) -> None:
        self._new = Metrics.counter(METRICS_NAMESPACE, "events_new")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "events_already_in_bigquery")

    def process(self, event: EnrichedEvent, known_ids: frozenset[int]) -> Iterator[EnrichedEvent]:
        if event.event.id in known_ids:
            self._skipped.inc()
            return
        self._new.inc()
        yield event


class KeepNewEvents(beam.PTransform):
    """The events whose id is not in ``existing_ids``, in the global window.

    ``ids_fit_in_memory``: the ids are few enough to hold as a set on every worker (a chunk of a local
    backfill: at most about ``--chunk_rows`` of them). The events then pass through one fused step against a
    side input, instead of a CoGroupByKey that holds every event of the range in the runner. Otherwise (one
    job over a long range on Dataflow) the events are joined with the ids by key, which scales with workers.
    """

    def __init__(
        self, existing_ids: beam.PCollection[int], ids_fit_in_memory: bool = False, event_lists: bool = False
    ) -> None:
        """``event_lists``: the input holds lists of events, and so does the output (``transforms/lists.py``)."""
        super().__init__()
        self._existing_ids = existing_ids
        self._ids_fit_in_memory = ids_fit_in_memory
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> beam.PCollection[EnrichedEvent]:
        if self._ids_fit_in_memory:
            known = self._existing_ids | "IdSet" >> beam.CombineGlobally(_IdSetFn())
            skip = per_item(_SkipKnownIdsFn(), self._event_lists)
            return events | "SkipKnownIds" >> beam.ParDo(skip, beam.pvalue.AsSingleton(known))
        if self._event_lists:
            events = events | "Events of lists" >> beam.FlatMap(items)
        keyed = events | "KeyById" >> beam.Map(lambda event: (event.event.id, event))
        existing = self._existing_ids | "KeyExisting" >> beam.Map(lambda event_id: (event_id, None))
        unwritten = (
            {"events": keyed, "existing": existing}
            | "JoinById" >> beam.CoGroupByKey()
            | "KeepUnwritten" >> beam.ParDo(_KeepUnwrittenFn())
        )
        if self._event_lists:
            unwritten = unwritten | "Lists again" >> beam.BatchElements(
                min_batch_size=LIST_ROWS, max_batch_size=LIST_ROWS
            )
        return unwritten


class _IdSetFn(beam.CombineFn):
    """The ids as one frozenset (empty when there are none)."""

    def create_accumulator(self) -> set[int]:
        return set()

    def add_input(self, accumulator: set[int], event_id: int) -> set[int]:
        accumulator.add(event_id)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[set[int]]) -> set[int]:
        merged: set[int] = set()
        for accumulator in accumulators:
            merged |= accumulator
        return merged

    def extract_output(self, accumulator: set[int]) -> frozenset[int]:
        return frozenset(accumulator)


def _pane_group_key(aggregate: WindowAggregate) -> tuple[int, str, bool]:
    # Deterministically encodable (a shuffle key cannot hold a datetime or None as such).
    micros = int(aggregate.window_start.timestamp() * 1_000_000)
    return micros, str(aggregate.content_id or ""), aggregate.content_missing


class KeepFinalPanes(beam.PTransform):
    """One aggregate per window: its last pane (panes accumulate, so the last holds the whole value).

    In batch a window should fire once, but a runner may still fire it more than once: Prism advances the
    watermark between the bundles of a stage, so part of a window's events can arrive after its on-time
    pane and fire a late one. Comparing or writing the partial panes would write values that a re-run
    writes again. The result is in the global window, emitted when the input is complete.
    """

    def expand(self, aggregates: beam.PCollection[WindowAggregate]) -> beam.PCollection[WindowAggregate]:
        return (
            aggregates
            | "KeyByWindowRow" >> beam.Map(lambda a: (_pane_group_key(a), a))
            | "AllPanes" >> beam.WindowInto(GlobalWindows())
            | "Group" >> beam.GroupByKey()
            | "Last" >> beam.MapTuple(lambda _, panes: max(panes, key=lambda a: (a.pane_index, a.emitted_at)))
        )


CHANGED = "changed"
UNCHANGED = "unchanged"


class _SplitByCurrentValueFn(beam.DoFn):
    def __init__(self) -> None:
        self._changed = Metrics.counter(METRICS_NAMESPACE, "aggregates_changed")
        self._unchanged = Metrics.counter(METRICS_NAMESPACE, "aggregates_unchanged")

    def process(self, aggregate: WindowAggregate, current: Mapping[WindowRowKey, Row]) -> Iterator[Any]:
        row = window_aggregate_row(aggregate)
        if aggregate_changed(row, current.get(window_row_key(row))):
            self._changed.inc()
            yield aggregate
        else:
            self._unchanged.inc()
            yield beam.pvalue.TaggedOutput(UNCHANGED, aggregate)


class SplitAggregatesByCurrentValue(beam.PTransform):
    """Aggregates whose value differs from the table's current one (main output, ``changed``) and those
    equal to it (``unchanged``). Elements keep their windows and timestamps."""

    def __init__(self, current: beam.PCollection[tuple[WindowRowKey, Row]]) -> None:
        super().__init__()
        self._current = current

    def expand(self, aggregates: beam.PCollection[WindowAggregate]) -> beam.pvalue.DoOutputsTuple:
        return aggregates | "CompareWithCurrent" >> beam.ParDo(
            _SplitByCurrentValueFn(), current=beam.pvalue.AsDict(self._current)
        ).with_outputs(UNCHANGED, main=CHANGED)
