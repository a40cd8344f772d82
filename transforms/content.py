"""Content metadata for enrichment: a snapshot of the ``content`` table, as a side input.

Batch reads it once. Streaming re-reads it on an interval (PeriodicImpulse); each snapshot carries the
time it was loaded and readers use the newest one they can see. Runners differ in what a triggered
global-window side input shows: Dataflow replaces the view with each fired pane, while the Python
DirectRunner appends every pane to it, so a singleton view fails there after the first refresh.
Reducing panes with ``Latest`` and picking the newest snapshot in the reader is correct on both.
A point lookup covers content created after the last refresh (SPEC §3: content created just before
its events must still be enriched).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

import apache_beam as beam
import tenacity
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger
from apache_beam.transforms.combiners import Latest
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import MAX_TIMESTAMP

from transforms.model import Content
from transforms.postgres import PostgresDsn, as_postgres, fetch_all
from transforms.retry import Backoff, retrying

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentSnapshot:
    """The content table as of ``loaded_at`` (epoch seconds), keyed by id."""

    loaded_at: float
    rows: Mapping[UUID, Content]

    @classmethod
    def of(cls, contents: Iterable[Content], loaded_at: float | None = None) -> ContentSnapshot:
        return cls(loaded_at=time.time() if loaded_at is None else loaded_at, rows={c.id: c for c in contents})

    def get(self, content_id: UUID) -> Content | None:
        return self.rows.get(content_id)

    def __len__(self) -> int:
        return len(self.rows)


def newest_snapshot(snapshots: Iterable[ContentSnapshot]) -> ContentSnapshot | None:
    return max(snapshots, key=lambda snapshot: snapshot.loaded_at, default=None)


ContentLoader = Callable[[], ContentSnapshot]
"""Returns the whole current content table; must be picklable (it runs on workers)."""

_LOOKUP_BACKOFF = Backoff(initial_seconds=0.4, max_seconds=5.0)
_CONTENT_COLUMNS = "id, slug, title, content_type, length_seconds, publish_ts"


def _content_from_row(row: tuple) -> Content:
    content_id, slug, title, content_type, length_seconds, publish_ts = row
    return Content(
        id=content_id,
        slug=slug,
        title=title,
        content_type=content_type,
        length_seconds=length_seconds,
        publish_ts=publish_ts,
    )


class PostgresContentLoader:
    """Reads the whole ``content`` table. A new connection per load: loads are minutes apart."""

    def __init__(self, dsn: str | PostgresDsn) -> None:
        self._dsn = dsn

    def __call__(self) -> ContentSnapshot:
        started = time.monotonic()
        loaded_at = time.time()
        rows = fetch_all(self._dsn, f"SELECT {_CONTENT_COLUMNS} FROM content")  # noqa: S608 - constant column list
        snapshot = ContentSnapshot.of((_content_from_row(row) for row in rows), loaded_at=loaded_at)
        _log.info("Loaded %d content rows in %.2fs", len(snapshot), time.monotonic() - started)
        return snapshot


class ContentLookup(Protocol):
    """A point lookup for content the side input does not know yet. Opened on the worker."""

    def setup(self) -> None: ...

    def get(self, content_id: UUID) -> Content | None: ...

    def teardown(self) -> None: ...


class PostgresContentLookup:
    """Looks content up by id in PostgreSQL, caching hits for ``hit_ttl_seconds`` and misses briefly.

    Hits expire so that, where the side input is read only once (runners without refreshing side
    inputs, see pipelines/streaming.py), edited content still reaches events within that time.
    Misses are cached briefly so an unknown id in a burst of events costs one query, not one per event,
    yet content inserted a moment later is still found.
    """

    def __init__(
        self,
        dsn: str | PostgresDsn,
        miss_ttl_seconds: float = 5.0,
        attempts: int = 3,
        hit_ttl_seconds: float = 300.0,
    ) -> None:
        self._dsn = dsn
        self._miss_ttl = miss_ttl_seconds
        self._hit_ttl = hit_ttl_seconds
        self._attempts = attempts
        self._connection = None
        self._hits: dict[UUID, tuple[Content, float]] = {}
        self._misses: dict[UUID, float] = {}

    def setup(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._connection = as_postgres(self._dsn).connect()
        self._connection.autocommit = True

    def get(self, content_id: UUID) -> Content | None:
        hit = self._hits.get(content_id)
        if hit is not None and time.monotonic() - hit[1] < self._hit_ttl:
            return hit[0]
        missed_at = self._misses.get(content_id)
        if missed_at is not None and time.monotonic() - missed_at < self._miss_ttl:
            return None
        row = self._query(content_id)
        if row is None:
            self._misses[content_id] = time.monotonic()
            return None
        content = _content_from_row(row)
        self._hits[content_id] = (content, time.monotonic())
        self._misses.pop(content_id, None)
        return content

    def _query(self, content_id: UUID) -> tuple | None:
        import psycopg2

        def forget_connection(_state: tenacity.RetryCallState) -> None:
            self._connection = None

        # A database outage is not bad input: after a few tries the error fails the bundle, which the runner
        # retries, rather than mark events as missing content they really have.
        for attempt in retrying(
            tenacity.retry_if_exception_type(psycopg2.OperationalError),
            _LOOKUP_BACKOFF,
            attempts=self._attempts,
            before_sleep=forget_connection,
        ):
            with attempt:
                if self._connection is None or self._connection.closed:
                    self._connect()
                with self._connection.cursor() as cursor:
                    cursor.execute(
                        f"SELECT {_CONTENT_COLUMNS} FROM content WHERE id = %s",  # noqa: S608
                        (str(content_id),),
                    )
                    return cursor.fetchone()
        return None

    def teardown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class ReadContentOnce(beam.PTransform):
    """One snapshot of the content table, for batch pipelines."""

    def __init__(self, loader: ContentLoader) -> None:
        super().__init__()
        self._loader = loader

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[ContentSnapshot]:
        loader = self._loader
        return begin | "Once" >> beam.Create([None]) | "LoadContent" >> beam.Map(lambda _: loader())


class RefreshingContent(beam.PTransform):
    """A snapshot of the content table re-read every ``interval_seconds`` while a streaming job runs."""

    def __init__(self, loader: ContentLoader, interval_seconds: float, stop_timestamp: float | None = None) -> None:
        """``stop_timestamp`` (epoch seconds) ends the refreshes, for tests; by default they never end."""
        super().__init__()
        if interval_seconds <= 0:
            raise ValueError("the content refresh interval must be positive")
        self._loader = loader
        self._interval_seconds = interval_seconds
        self._stop_timestamp = stop_timestamp

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[ContentSnapshot]:
        loader = self._loader
        return (
            begin
            | "EveryInterval"
            >> PeriodicImpulse(
                start_timestamp=time.time(),
                stop_timestamp=self._stop_timestamp if self._stop_timestamp is not None else MAX_TIMESTAMP,
                fire_interval=self._interval_seconds,
                apply_windowing=False,
            )
            | "LoadContent" >> beam.Map(lambda _: loader())
            | "ReportSize" >> beam.ParDo(ReportSnapshotSizeFn())
            | "KeepNewest" >> KeepNewestSnapshot()
        )


class KeepNewestSnapshot(beam.PTransform):
    """Fires each loaded snapshot as its own pane of the global window, reduced to the newest one.

    On runners that replace a side input's view with each pane, readers see one snapshot; on those that
    accumulate panes, readers still pick the newest by ``loaded_at`` (see ``newest_snapshot``).
    """

    def expand(self, snapshots: beam.PCollection[ContentSnapshot]) -> beam.PCollection[ContentSnapshot]:
        return (
            snapshots
            | "FireOnEachSnapshot"
            >> beam.WindowInto(
                GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterCount(1)),
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
            )
            | "Newest" >> Latest.Globally().without_defaults()
        )


class ReportSnapshotSizeFn(beam.DoFn):
    """Reports each loaded snapshot's row count as a gauge, so a stale or empty side input is visible."""

    def __init__(self) -> None:
        self._rows = Metrics.gauge("content", "snapshot_rows")
        self._loads = Metrics.counter("content", "snapshots_loaded")

    def process(self, snapshot: ContentSnapshot) -> Iterator[ContentSnapshot]:
        self._rows.set(len(snapshot))
        self._loads.inc()
        yield snapshot
