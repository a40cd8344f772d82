"""Reading ``engagement_events`` for a time range from PostgreSQL, in parallel id-range splits.

Rows are read with their column types and become events directly (``decode.event_from_table_row``), at about
half the cost of decoding them as JSON. A row that function is not sure of becomes instead the same
``RawRecord`` the streaming job reads from Kafka (a plain JSON event, as PostgreSQL writes the row), so
``decode_record`` validates it, or dead-letters it with its reason, with exactly the code streaming uses.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.decode import TABLE_ROW_COLUMNS, DecodeLimits, event_from_table_row
from transforms.model import EngagementEvent, RawRecord, SourceCoordinates
from transforms.postgres import PostgresDsn, as_postgres, fetch_all

_log = logging.getLogger(__name__)

# UUIDs and JSONB as text: psycopg2 would parse JSONB into Python objects, which event_from_table_row reads
# from the text itself (its depth first).
_TYPED_COLUMNS = ", ".join(
    f"{column}::text" if column in ("content_id", "user_id", "raw_payload") else column for column in TABLE_ROW_COLUMNS
)
_SELECT_RANGE = (
    f"SELECT {_TYPED_COLUMNS} FROM engagement_events"  # noqa: S608 - constant column list
    " WHERE id >= %s AND id < %s AND event_ts >= %s AND event_ts < %s ORDER BY id"
)
# A row as the plain JSON event an application would send, for the rows only decode_record can judge.
# Timestamps come out as ISO 8601 in the session's time zone, UTC.
_ROW_AS_JSON = "json_build_object(" + ", ".join(f"'{column}', {column}" for column in TABLE_ROW_COLUMNS) + ")::text"
_SELECT_DOCUMENT = f"SELECT {_ROW_AS_JSON} FROM engagement_events WHERE id = %s"  # noqa: S608 - constant


@dataclass(frozen=True)
class TimeRange:
    """The half-open range ``[start, end)`` on ``event_ts``."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("--start and --end need a UTC offset (e.g. 2026-11-22T00:00:00Z)")
        if self.end <= self.start:
            raise ValueError(f"--end ({self.end.isoformat()}) must be after --start ({self.start.isoformat()})")

    @classmethod
    def parse(cls, start: str, end: str) -> TimeRange:
        return cls(start=_parse_instant("--start", start), end=_parse_instant("--end", end))


def _parse_instant(flag: str, text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{flag} {text!r} is not an ISO-8601 date or time") from exc


@dataclass(frozen=True)
class IdRange:
    """Event ids ``[low, high)`` read by one split."""

    low: int
    high: int
    index: int
    count: int


@dataclass(frozen=True)
class RangeSummary:
    """What the range holds, measured before the pipeline starts (for the splits and for progress)."""

    rows: int
    min_id: int | None
    max_id: int | None


SOURCE_TABLES = ("engagement_events", "content")


def missing_source_tables(dsn: str | PostgresDsn, connect_timeout_seconds: int = 10) -> list[str]:
    """The tables of ``SOURCE_TABLES`` the database lacks; connecting is the reachability check."""
    rows = fetch_all(
        dsn,
        "SELECT name FROM unnest(%s::text[]) AS name WHERE to_regclass(name) IS NULL",
        (list(SOURCE_TABLES),),
        connect_timeout_seconds,
    )
    return [name for (name,) in rows]


def missing_event_columns(dsn: str | PostgresDsn, connect_timeout_seconds: int = 10) -> list[str]:
    """The SPEC columns of ``engagement_events`` the live table lacks (renamed or dropped), in SPEC order."""
    rows = fetch_all(
        dsn,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'engagement_events'",
        connect_timeout_seconds=connect_timeout_seconds,
    )
    live = {name for (name,) in rows}
    return [column for column in TABLE_ROW_COLUMNS if column not in live]


def summarize_range(dsn: str | PostgresDsn, time_range: TimeRange, connect_timeout_seconds: int = 10) -> RangeSummary:
    """Counts the rows of the range (the index on ``event_ts`` makes this cheap)."""
    [(rows, min_id, max_id)] = fetch_all(
        dsn,
        "SELECT count(*), min(id), max(id) FROM engagement_events WHERE event_ts >= %s AND event_ts < %s",
        (time_range.start, time_range.end),
        connect_timeout_seconds,
    )
    return RangeSummary(rows=rows, min_id=min_id, max_id=max_id)


def split_id_range(summary: RangeSummary, splits: int) -> list[IdRange]:
    """Equal-width id ranges covering ``[min_id, max_id]``; ids are dense enough in a BIGSERIAL table."""
    if splits < 1:
        raise ValueError("the number of read splits must be at least 1")
    if summary.rows == 0 or summary.min_id is None or summary.max_id is None:
        return []
    span = summary.max_id - summary.min_id + 1
    count = min(splits, span)
    width = -(-span // count)  # ceiling division: the last split may be shorter, none is empty
    ranges = []
    for index in range(count):
        low = summary.min_id + index * width
        high = min(low + width, summary.max_id + 1)
        if low < high:
            ranges.append(IdRange(low=low, high=high, index=index, count=count))
    return ranges


def row_to_raw_record(event_id: int, document: str) -> RawRecord:
    """A row, as PostgreSQL wrote it in JSON (``_ROW_AS_JSON``), with its table coordinates."""
    # Built without validating again: both fields come from this module, and each row costs this per event.
    source = SourceCoordinates.trusted(
        kind="postgres", topic=None, partition=None, offset=None, table="engagement_events", row_id=event_id
    )
    return RawRecord.trusted(value=document.encode(), key=None, source=source)


class ProgressLog:
    """Rows of one backfill run through one step in this worker process, logged at most every ``interval``
    seconds with the total, the rate and the estimated time left.

    On the local runners every bundle runs in one process, so this is the whole job's progress; on
    Dataflow each worker logs its share and the step's counter has the sum. Keyed by run and step, so
    two backfills in one process (tests) do not add up.
    """

    _lock = threading.Lock()
    _entries: ClassVar[dict[tuple[str, str], ProgressLog]] = {}
    _forwards: ClassVar[dict[str, Any]] = {}

    @classmethod
    def forward_to(cls, step: str, shared_count: Any) -> None:
        """Also adds this process's rows of ``step`` to ``shared_count`` (a ``multiprocessing.Value``), for a
        parent that runs several jobs in processes of their own and reports their sum."""
        with cls._lock:
            cls._forwards[step] = shared_count

    def __init__(self) -> None:
        self.rows = 0
        self.started = time.monotonic()
        self.last_log = self.started

    @classmethod
    def begin(cls, run: str, step: str) -> None:
        """Starts the clock at the first bundle rather than at the first rows counted."""
        with cls._lock:
            cls._entries.setdefault((run, step), cls())

    @classmethod
    def add(cls, run: str, step: str, rows: int, total: int, interval: float = 5.0, final: bool = False) -> None:
        with cls._lock:
            progress = cls._entries.setdefault((run, step), cls())
            progress.rows += rows
            shared = cls._forwards.get(step)
            if shared is not None and rows:
                with shared.get_lock():
                    shared.value += rows
            now = time.monotonic()
            if not (final and progress.rows >= total) and now - progress.last_log < interval:
                return
            progress.last_log = now
            elapsed = max(now - progress.started, 1e-6)
            rate = progress.rows / elapsed
            left = max(total - progress.rows, 0)
            eta = f"about {left / rate:.0f}s left" if rate > 0 else "time left unknown"
            _log.info(
                "backfill: %s %d of %d rows (%.1f%%), %.0f rows/s, %s",
                step,
                progress.rows,
                total,
                100.0 * progress.rows / total if total else 100.0,
                rate,
                eta,
            )


class LogProgressFn(beam.DoFn):
    """Passes elements through, counting them into the ``step`` progress of run ``run``."""

    def __init__(self, run: str, step: str, total: int, every: int = 1_000) -> None:
        self._run = run
        self._step = step
        self._total = total
        self._every = every
        self._pending = 0

    def start_bundle(self) -> None:
        ProgressLog.begin(self._run, self._step)
        self._pending = 0

    def process(self, element: Any) -> Iterator[Any]:
        self._pending += 1
        if self._pending == self._every:
            ProgressLog.add(self._run, self._step, self._pending, self._total)
            self._pending = 0
        yield element

    def finish_bundle(self) -> None:
        ProgressLog.add(self._run, self._step, self._pending, self._total, final=True)
        self._pending = 0


class ReadIdRangeFn(beam.DoFn):
    """Streams one id range through a server-side cursor, so memory stays flat whatever its size.

    Emits an ``EngagementEvent`` for each row ``event_from_table_row`` builds, and the row's JSON document as a
    ``RawRecord`` for the others, for the decode step to judge; with ``list_rows``, lists of at most that many
    of them (``transforms/lists.py``)."""

    def __init__(
        self,
        dsn: str | PostgresDsn,
        time_range: TimeRange,
        total_rows: int,
        fetch_size: int = 10_000,
        run: str | None = None,
        limits: DecodeLimits | None = None,
        list_rows: int | None = None,
    ) -> None:
        if list_rows is not None and list_rows < 1:
            raise ValueError(f"list_rows must be positive, not {list_rows}")
        self._dsn = dsn
        self._list_rows = list_rows
        self._run = run or uuid.uuid4().hex
        self._time_range = time_range
        self._total_rows = total_rows
        self._fetch_size = fetch_size
        self._limits = limits or DecodeLimits()
        self._rows_read = Metrics.counter("backfill", "rows_read")
        self._rows_as_documents = Metrics.counter("backfill", "rows_read_as_json")
        self._splits_done = Metrics.counter("backfill", "splits_done")
        self._connection = None

    def setup(self) -> None:
        # UTC: the rows' timestamps are written into their JSON in the session's time zone.
        self._connection = as_postgres(self._dsn).connect(options="-c TimeZone=UTC")
        # A repeatable snapshot per split; read-only so a backfill can never write the source.
        self._connection.set_session(readonly=True)

    def start_bundle(self) -> None:
        ProgressLog.begin(self._run, "read")

    def process(self, id_range: IdRange) -> Iterator[EngagementEvent | RawRecord | list[EngagementEvent | RawRecord]]:
        if self._list_rows is None:
            yield from self._read(id_range)
            return
        page: list[EngagementEvent | RawRecord] = []
        for item in self._read(id_range):
            page.append(item)
            if len(page) == self._list_rows:
                yield page
                page = []
        if page:
            yield page

    def _read(self, id_range: IdRange) -> Iterator[EngagementEvent | RawRecord]:
        pending = 0
        limits = self._limits
        connection = self._connection
        with connection, connection.cursor(name=f"backfill_split_{id_range.index}") as cursor:
            cursor.itersize = self._fetch_size
            cursor.execute(_SELECT_RANGE, (id_range.low, id_range.high, self._time_range.start, self._time_range.end))
            for row in cursor:
                pending += 1
                if pending == self._fetch_size:
                    self._report(pending)
                    pending = 0
                event = event_from_table_row(row, limits)
                if event is None:
                    yield self._as_document(row[0])
                else:
                    yield event
        self._report(pending, final=True)
        self._splits_done.inc()

    def _as_document(self, event_id: int) -> RawRecord:
        # In the split's transaction, beside its open cursor: the same snapshot of the row.
        with self._connection.cursor() as cursor:
            cursor.execute(_SELECT_DOCUMENT, (event_id,))
            (document,) = cursor.fetchone()
        self._rows_as_documents.inc()
        return row_to_raw_record(event_id, document)

    def _report(self, rows: int, final: bool = False) -> None:
        self._rows_read.inc(rows)
        ProgressLog.add(self._run, "read", rows, self._total_rows, final=final)

    def teardown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ReadEventsFromPostgres(beam.PTransform):
    """``engagement_events`` rows with ``event_ts`` in ``[start, end)``, read in parallel, as events or (rows only
    ``decode_record`` can judge) ``RawRecord``: the input of ``DecodeRecords`` with the same ``limits``."""

    def __init__(
        self,
        dsn: str | PostgresDsn,
        time_range: TimeRange,
        summary: RangeSummary,
        splits: int,
        run: str | None = None,
        limits: DecodeLimits | None = None,
        list_rows: int | None = None,
    ) -> None:
        """``run`` names the run in progress logs (``LogProgressFn`` steps of the same run log alongside);
        ``list_rows``: emit lists of at most that many rows instead of single ones (``transforms/lists.py``)."""
        super().__init__()
        self._run = run or uuid.uuid4().hex
        self._list_rows = list_rows
        self._limits = limits
        self._dsn = dsn
        self._time_range = time_range
        self._summary = summary
        self._ranges = split_id_range(summary, splits)

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[EngagementEvent | RawRecord]:
        return (
            begin
            | "IdRanges" >> beam.Create(self._ranges)
            # Without the reshuffle a runner may fuse the splits into one bundle and read them one by one.
            | "SpreadSplits" >> beam.Reshuffle()
            | "ReadRange"
            >> beam.ParDo(
                ReadIdRangeFn(
                    self._dsn,
                    self._time_range,
                    self._summary.rows,
                    run=self._run,
                    limits=self._limits,
                    list_rows=self._list_rows,
                )
            )
        )
