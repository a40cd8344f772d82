"""The backfill (SPEC §7): ``engagement_events`` with ``event_ts`` in ``[start, end)``, read from PostgreSQL in
parallel id splits, through the streaming job's transforms in batch mode, into the same sinks.

    python -m pipelines.backfill --start 2026-11-22T00:00:00Z --end 2026-11-23T00:00:00Z [options]
    scripts/backfill --start ... --end ...          # the same, with the local stack's endpoints, on the FnApiRunner

PostgreSQL rows -> build_core (decode, de-duplicate, enrich with a content snapshot, window aggregates)
  enriched events   -> skip ids enriched_events already holds -> BigQuery (and the HTTP API if asked)
  window aggregates -> skip windows whose value equals window_aggregates_current -> BigQuery
                    -> every window -> Redis (overwrites; buckets older than their TTL are skipped)
  dead letters      -> BigQuery dead_letters

So a backfill never duplicates what streaming (or an earlier backfill) wrote, and running it twice leaves
every sink as after the first run. Every check that needs no pipeline (dates, database, tables) runs
before anything is written; a failed check exits with status 2 and a one-line message. A range with more
than --chunk_rows rows runs as consecutive jobs over window-aligned sub-ranges, because local runners hold
all of a batch job's data in memory. See docs/backfill.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines.core import CoreOutputs, CoreSettings, build_core
from pipelines.options import CoreOptions, postgres_from_options, with_state_cache
from pipelines.outputs import SinkSettings, write_outputs
from pipelines.preflight import PreflightError, check_postgres, one_line
from transforms.backfill_filters import (
    KeepFinalPanes,
    KeepNewEvents,
    ReadCurrentAggregates,
    ReadExistingEventIds,
    SplitAggregatesByCurrentValue,
    check_window_aligned,
)
from transforms.bigquery_reads import BigQueryReadSettings, bigquery_client
from transforms.content import PostgresContentLoader, PostgresContentLookup, ReadContentOnce
from transforms.dead_letters import flatten_dead_letters
from transforms.lists import LIST_ROWS, per_item
from transforms.postgres import PostgresDsn, fetch_all
from transforms.postgres_source import (
    LogProgressFn,
    ProgressLog,
    RangeSummary,
    ReadEventsFromPostgres,
    TimeRange,
    missing_event_columns,
    summarize_range,
)
from transforms.settings import print_options_help
from transforms.sinks.bigquery import LOCAL_STORAGE_WRITE, BigQuerySinkOptions, BigQuerySinkSettings
from transforms.sinks.http_api import HttpSinkOptions, HttpSinkSettings
from transforms.sinks.redis_client import connect
from transforms.sinks.redis_top import RedisSinkOptions, RedisSinkSettings, WriteTopContentToRedis

_log = logging.getLogger(__name__)

PREFLIGHT_EXIT_STATUS = 2
DEFAULT_CHUNK_ROWS = 250_000
LOCAL_RUNNERS = frozenset({"direct", "bundlebaseddirect", "switchingdirect", "prism", "fnapi"})
"""Runners that hold a batch job's data in the launching machine's memory (names lower-cased, no "Runner")."""


class BackfillOptions(PipelineOptions):
    """What to backfill and how to reach the sinks' current contents."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--start",
            default=None,
            help="First instant of the range on event_ts, inclusive; ISO-8601 with a UTC offset "
            "(2026-11-22T00:00:00Z). Must be on a window boundary (--window_seconds).",
        )
        parser.add_argument(
            "--end",
            default=None,
            help="End of the range on event_ts, exclusive; ISO-8601 with a UTC offset, on a window boundary.",
        )
        parser.add_argument(
            "--read_splits",
            type=int,
            default=8,
            help="Number of id ranges PostgreSQL is read in, in parallel (one query and connection each).",
        )
        parser.add_argument(
            "--send_to_http_api",
            action="store_true",
            default=False,
            help=(
                "Also send the events new to BigQuery to the external HTTP API (off by default). Batches use "
                "the streaming job's idempotency keys, but a batch's key depends on its set of ids, so events "
                "the API already got in other batches would be stored again: see docs/backfill.md."
            ),
        )
        parser.add_argument(
            "--chunk_rows",
            type=int,
            default=None,
            help=(
                "Run the range as jobs over window-aligned sub-ranges of at most about this many rows each (a "
                "window is never split: one with more rows is a chunk of its own), --parallel_chunks at a time. "
                "Local runners hold all of a batch job's data in memory, so this bounds "
                f"the memory of a long range. 0: the whole range in one job. Default: {DEFAULT_CHUNK_ROWS} on "
                "the local runners (FnApiRunner, Prism, Direct), 0 on the others (Dataflow)."
            ),
        )
        parser.add_argument(
            "--skip_writes",
            action="store_true",
            default=False,
            help=(
                "Run the whole graph, including the reads of what BigQuery already holds, but write nothing: "
                "the summary's counters say what a real run would write, and the time is the graph's own."
            ),
        )
        parser.add_argument(
            "--parallel_chunks",
            type=int,
            default=None,
            help=(
                "How many chunks run at the same time, each job in a process of its own. A job's Python work "
                "runs in one process, so on one core; parallel chunks use the others. Default: the machine's "
                "cores on the local runners, 1 on the others (there, one job scales by its workers)."
            ),
        )
        parser.add_argument(
            "--preflight_timeout_seconds",
            type=int,
            default=10,
            help="Connect timeout of the checks made before the pipeline starts (PostgreSQL, BigQuery, Redis).",
        )


@dataclass(frozen=True)
class BackfillPlan:
    """Everything the pipeline is built from, checked before anything is written."""

    time_range: TimeRange
    summary: RangeSummary
    dsn: PostgresDsn
    """Its password, if any, read by whoever connects (``postgres_from_options``)."""
    read_splits: int
    core: CoreSettings
    sinks: SinkSettings
    bigquery_read: BigQueryReadSettings
    content_lookup: bool
    chunk_rows: int = 0
    parallel_chunks: int = 1
    skip_writes: bool = False
    chunks: tuple[TimeRange, ...] = ()
    """The sub-ranges run one after another (one job each); empty before the preflight has counted them."""


def plan_from_options(options: PipelineOptions) -> BackfillPlan:
    """The plan without touching any service (raises ``PreflightError`` on bad options); its summary is empty."""
    backfill = options.view_as(BackfillOptions)
    core_options = options.view_as(CoreOptions)
    if backfill.start is None or backfill.end is None:
        raise PreflightError("--start and --end are required (ISO-8601 with a UTC offset)")
    try:
        time_range = TimeRange.parse(backfill.start, backfill.end)
        check_window_aligned(time_range, core_options.window_seconds)
        if backfill.read_splits < 1:
            raise ValueError("--read_splits must be at least 1")
        chunk_rows = backfill.chunk_rows
        if chunk_rows is None:
            chunk_rows = DEFAULT_CHUNK_ROWS if runs_locally(options) else 0
        if chunk_rows < 0:
            raise ValueError("--chunk_rows must be 0 (one job) or positive")
        parallel_chunks = backfill.parallel_chunks
        if parallel_chunks is None:
            parallel_chunks = (os.cpu_count() or 1) if runs_locally(options) else 1
        if parallel_chunks < 1:
            raise ValueError("--parallel_chunks must be at least 1")
        if submits_template(options) and chunk_rows:
            # Each chunk's run would overwrite the one job file the launcher submits.
            raise ValueError("a template launch submits one job: use --chunk_rows=0 (the default on Dataflow)")
        # engagement_events.id is the primary key and the read splits are disjoint id ranges; the reader hands
        # on its rows in lists (transforms/lists.py).
        core = dataclasses.replace(
            CoreSettings.from_options(options, streaming=False), ids_unique_at_source=True, event_lists=True
        )
        bigquery = BigQuerySinkSettings.from_options(options)
        redis_config = RedisSinkSettings.from_options(options, window_seconds=core.windows.window_seconds)
        postgres = postgres_from_options(options)
        http = HttpSinkSettings.from_options(options) if backfill.send_to_http_api else None
        if http is not None:
            http = dataclasses.replace(http, bounded_input=True)
    except ValueError as error:
        raise PreflightError(one_line(error)) from error
    if backfill.send_to_http_api and http is None:
        raise PreflightError("--send_to_http_api contradicts --http_api_sink=disabled")
    if bigquery.write_method == LOCAL_STORAGE_WRITE and not options.view_as(BigQuerySinkOptions).bigquery_rest_endpoint:
        raise PreflightError("--bigquery_write_method=local_storage_write needs --bigquery_rest_endpoint")
    plan = BackfillPlan(
        time_range=time_range,
        summary=RangeSummary(rows=0, min_id=None, max_id=None),
        dsn=postgres,
        read_splits=backfill.read_splits,
        core=core,
        sinks=SinkSettings(bigquery=bigquery, redis=redis_config, http=http),
        bigquery_read=BigQueryReadSettings.of_sink(
            bigquery, options.view_as(BigQuerySinkOptions).bigquery_rest_endpoint
        ),
        content_lookup=core_options.content_lookup == "postgres",
        chunk_rows=chunk_rows,
        parallel_chunks=parallel_chunks,
        skip_writes=backfill.skip_writes,
    )
    return plan


def runs_locally(options: PipelineOptions) -> bool:
    """Whether the runner keeps the job's data in this machine's memory (Beam's default runner is local).

    Elsewhere (Dataflow) a job's size is the workers' concern, and chunks would only start more jobs.
    """
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return True
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.lower().removesuffix("runner") in LOCAL_RUNNERS


def preflight(options: PipelineOptions) -> BackfillPlan:
    """Checks the options, PostgreSQL, BigQuery and Redis; returns the plan with the range's row count."""
    plan = plan_from_options(options)
    timeout = options.view_as(BackfillOptions).preflight_timeout_seconds
    plan = _check_postgres(plan, timeout)
    _check_bigquery(plan)
    _check_redis(plan, timeout)
    return plan


def _check_postgres(plan: BackfillPlan, timeout: int) -> BackfillPlan:
    import psycopg2

    check_postgres(plan.dsn, connect_timeout_seconds=timeout)
    try:
        if missing := missing_event_columns(plan.dsn, connect_timeout_seconds=timeout):
            # The streaming job reads on with NULL in a lost nullable column (schema drift), since stopping would
            # stop every sink; a backfill is a deliberate correction run, so it asks first instead of writing NULLs.
            raise PreflightError(
                f"engagement_events has no column {', '.join(missing)} (renamed or dropped?): the backfill reads "
                "every SPEC §1 column; restore the column, or backfill from a database that has it"
            )
        summary = summarize_range(plan.dsn, plan.time_range, connect_timeout_seconds=timeout)
        chunks: tuple[TimeRange, ...] = (plan.time_range,)
        if plan.chunk_rows and summary.rows > plan.chunk_rows:
            window_seconds = plan.core.windows.window_seconds
            counts = rows_per_window(plan.dsn, plan.time_range, window_seconds, connect_timeout_seconds=timeout)
            chunks = tuple(
                split_into_chunks(plan.time_range, window_seconds, counts, plan.chunk_rows, first_chunk_rows(plan))
            )
    except psycopg2.Error as error:
        # libpq's message names host and port, never the password.
        raise PreflightError(f"cannot use PostgreSQL: {one_line(error)}") from error
    return dataclasses.replace(plan, summary=summary, chunks=chunks)


def first_chunk_rows(plan: BackfillPlan) -> int | None:
    """A smaller first chunk when chunks run in parallel, so the jobs fall out of step.

    A chunk job computes its graph (CPU-bound) and then appends its rows (bound by BigQuery; locally by the
    emulator, which needs a core of its own while the job waits). Jobs started together stay in step: all
    compute, then all wait on appends, and neither the cores nor the emulator are ever busy together. Making
    the first chunk 1/parallel_chunks of the others staggers the jobs from the start, so one job's appends
    overlap another's graph (docs/backfill.md, "Parallel chunks")."""
    if plan.parallel_chunks < 2:
        return None
    return max(1, plan.chunk_rows // plan.parallel_chunks)


def rows_per_window(
    dsn: str | PostgresDsn, time_range: TimeRange, window_seconds: int, connect_timeout_seconds: int = 10
) -> list[tuple[int, int]]:
    """``(window start in epoch seconds, rows)`` for each window of the range that has rows, in order."""
    # Beam's fixed windows start at multiples of their size since the epoch; so does this bucket.
    rows = fetch_all(
        dsn,
        "SELECT (floor(extract(epoch FROM event_ts) / %(w)s) * %(w)s)::bigint AS window_start, count(*)"
        " FROM engagement_events WHERE event_ts >= %(start)s AND event_ts < %(end)s"
        " GROUP BY 1 ORDER BY 1",
        {"w": window_seconds, "start": time_range.start, "end": time_range.end},
        connect_timeout_seconds,
    )
    return [(int(start), int(count)) for start, count in rows]


def split_into_chunks(
    time_range: TimeRange,
    window_seconds: int,
    rows_per_window: Sequence[tuple[int, int]],
    max_rows: int,
    first_max_rows: int | None = None,
) -> list[TimeRange]:
    """Consecutive window-aligned sub-ranges covering ``time_range``, each of at most ``max_rows`` rows
    (the first at most ``first_max_rows``) unless a single window holds more (a window is never split: its
    value must come from all its events).

    ``rows_per_window`` is ``(window start in epoch seconds, rows)`` in order; windows without rows may be
    left out, and fall into whichever chunk spans them.
    """
    if max_rows < 1 or (first_max_rows is not None and first_max_rows < 1):
        raise ValueError("max_rows must be positive")
    cuts: list[datetime] = []
    in_chunk = 0
    for start, rows in rows_per_window:
        limit = max_rows if cuts or first_max_rows is None else first_max_rows
        if in_chunk and in_chunk + rows > limit:
            cut = datetime.fromtimestamp(start - start % window_seconds, UTC)
            if time_range.start < cut < time_range.end:
                cuts.append(cut)
                in_chunk = 0
        in_chunk += rows
    bounds = [time_range.start, *cuts, time_range.end]
    return [TimeRange(first, last) for first, last in itertools.pairwise(bounds)]


def _check_bigquery(plan: BackfillPlan) -> None:
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from requests import exceptions as http_exceptions

    bigquery = plan.sinks.bigquery
    tables = (bigquery.events_table, bigquery.aggregates_table, bigquery.dead_letters_table)
    where = plan.bigquery_read.rest_endpoint or "BigQuery"
    try:
        client = bigquery_client(plan.bigquery_read)
    except auth_exceptions.GoogleAuthError as error:
        raise PreflightError(f"cannot use BigQuery: {one_line(error)}") from error
    try:
        for table in tables:
            table_id = plan.bigquery_read.table_id(table)
            try:
                client.get_table(table_id, timeout=30)
            except api_exceptions.NotFound as error:
                raise PreflightError(
                    f"BigQuery table {table_id} does not exist (create it with scripts/bigquery-ddl)"
                ) from error
    except (api_exceptions.GoogleAPIError, http_exceptions.RequestException) as error:
        raise PreflightError(f"cannot reach BigQuery at {where}: {one_line(error)[:300]}") from error
    finally:
        client.close()


def _check_redis(plan: BackfillPlan, timeout: int) -> None:
    import redis

    client = connect(plan.sinks.redis.url, connect_timeout_seconds=timeout)
    try:
        client.ping()
    except redis.RedisError as error:
        # The URL may hold a password: name the error only.
        raise PreflightError(f"cannot reach Redis (--redis_url): {one_line(error)}") from error
    finally:
        client.close()


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions, plan: BackfillPlan | None = None) -> None:
    """Adds the backfill of ``plan.time_range`` to ``pipeline`` as one job, whatever its chunks (``run_chunks``
    runs one job per chunk); runs the preflight checks unless given their ``plan``."""
    plan = plan or preflight(options)
    dsn = plan.dsn
    run = uuid.uuid4().hex
    lists = plan.core.event_lists
    raw = pipeline | "Read engagement_events" >> ReadEventsFromPostgres(
        dsn,
        plan.time_range,
        plan.summary,
        plan.read_splits,
        run=run,
        limits=plan.core.decode,
        list_rows=LIST_ROWS if lists else None,
    )
    content = pipeline | "Read content" >> ReadContentOnce(PostgresContentLoader(dsn))
    lookup = functools.partial(PostgresContentLookup, dsn) if plan.content_lookup else None
    core = build_core(raw, content, plan.core, content_lookup=lookup)
    # Reading is only the start of a long run: the enrichment's progress shows how far the graph got.
    progress = per_item(LogProgressFn(run, "enriched", plan.summary.rows), lists)
    enriched = core.enriched | "Progress" >> beam.ParDo(progress)

    existing_ids = pipeline | "Ids in BigQuery" >> ReadExistingEventIds(plan.bigquery_read, plan.time_range)
    current = pipeline | "Windows in BigQuery" >> ReadCurrentAggregates(
        plan.bigquery_read, plan.time_range, plan.core.windows.window_seconds
    )
    # A chunk's ids fit in a set on the worker; a whole range in one job (Dataflow) is joined by key instead.
    new_events = enriched | "Skip events in BigQuery" >> KeepNewEvents(
        existing_ids, ids_fit_in_memory=plan.chunk_rows > 0, event_lists=lists
    )
    final = core.aggregates | "Final pane per window" >> KeepFinalPanes()
    aggregates = final | "Compare windows with BigQuery" >> SplitAggregatesByCurrentValue(current)
    if plan.skip_writes:
        # The filters above count what would be written (backfill/events_new, aggregates_changed, ...).
        return

    # Redis gets every window of the range (its writes overwrite, so equal values change nothing): the
    # changed ones through write_outputs with BigQuery, the unchanged ones here.
    unchanged_to_redis = aggregates.unchanged | "Redis top content (unchanged windows)" >> WriteTopContentToRedis(
        plan.sinks.redis
    )
    dead_letters = flatten_dead_letters("Dead letters before the sinks", core.dead_letters, unchanged_to_redis)
    write_outputs(
        CoreOutputs(
            enriched=new_events, aggregates=aggregates.changed, dead_letters=dead_letters, enriched_lists=lists
        ),
        plan.sinks,
    )


# --- command line -----------------------------------------------------------------------------------------

OPTION_CLASSES: tuple[type[PipelineOptions], ...] = (
    BackfillOptions,
    CoreOptions,
    BigQuerySinkOptions,
    RedisSinkOptions,
    HttpSinkOptions,
)

_SUMMARY_COUNTERS = (
    ("backfill", "rows_read"),
    ("backfill", "events_new"),
    ("backfill", "events_already_in_bigquery"),
    ("backfill", "aggregates_changed"),
    ("backfill", "aggregates_unchanged"),
    ("sink.bigquery", "enriched_events.rows_written"),
    # Rows a retried bundle found written by its failed attempt: written once, counted here instead.
    ("sink.bigquery", "enriched_events.rows_already_written"),
    ("sink.bigquery", "window_aggregates.rows_written"),
    ("sink.bigquery", "window_aggregates.rows_already_written"),
    ("sink.redis", "written"),
    ("sink.redis", "skipped_expired"),
    ("sink.http", "events_sent"),
    ("sink.bigquery", "enriched_events.dead_lettered"),
    ("sink.bigquery", "window_aggregates.dead_lettered"),
    ("sink.redis", "dead_lettered"),
    ("sink.http", "dead_lettered"),
)


def print_help() -> None:
    print_options_help("python -m pipelines.backfill", __doc__, OPTION_CLASSES)


def configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Progress (rows read of the total, rate, time left) and the plan and summary of this module.
    for name in (__name__, "transforms.postgres_source"):
        logging.getLogger(name).setLevel(logging.INFO)


def counter_totals(result: beam.runners.runner.PipelineResult) -> dict[tuple[str, str], int]:
    """The job's counters by (namespace, name); empty when the runner reports none."""
    try:
        counters = result.metrics().query()["counters"]
    except (NotImplementedError, AttributeError, KeyError, ValueError):
        # ValueError: a runner with no job to ask ("Can not query metrics. Job id is unknown.").
        return {}
    totals: Counter[tuple[str, str]] = Counter()
    for counter in counters:
        key = (counter.key.metric.namespace, counter.key.metric.name)
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[key] += value or 0
    return totals


def log_summary(totals: dict[tuple[str, str], int]) -> None:
    parts = [
        f"{namespace}/{name}={totals[namespace, name]}"
        for namespace, name in _SUMMARY_COUNTERS
        if (namespace, name) in totals
    ]
    _log.info("backfill done: %s", ", ".join(parts))


def run_chunks(options: PipelineOptions, plan: BackfillPlan) -> dict[tuple[str, str], int]:
    """Runs one job per chunk of ``plan``; returns the counters summed over all of them.

    Each job is the whole backfill of its sub-range (reads, filters against BigQuery, sinks), so a run
    that stops part-way leaves the finished chunks complete, and re-running the range skips them. Chunks
    share nothing (a window, and so an event id, lies in exactly one), so up to ``plan.parallel_chunks`` of
    them run at once, each in a process of its own.
    """
    chunks = plan.chunks or (plan.time_range,)
    if len(chunks) == 1:
        return _run_job(options, plan)
    if plan.parallel_chunks > 1:
        return _run_chunks_in_processes(options, plan, chunks)
    totals: Counter[tuple[str, str]] = Counter()
    started = time.monotonic()
    for index, chunk in enumerate(chunks, start=1):
        chunk_plan = plan_of_chunk(plan, chunk)
        _log.info(
            "backfill: chunk %d of %d, [%s, %s): %d rows",
            index,
            len(chunks),
            chunk.start.isoformat(),
            chunk.end.isoformat(),
            chunk_plan.summary.rows,
        )
        totals.update(_run_job(options, chunk_plan))
        done = totals.get(("backfill", "rows_read"), 0)
        _log.info(
            "backfill: %d of %d chunks done, %s",
            index,
            len(chunks),
            progress_text(done, plan.summary.rows, time.monotonic() - started),
        )
    return totals


def plan_of_chunk(plan: BackfillPlan, chunk: TimeRange) -> BackfillPlan:
    # The chunk's own id span keeps its read splits even; the count is cheap (index on event_ts).
    return dataclasses.replace(plan, time_range=chunk, summary=summarize_range(plan.dsn, chunk), chunks=(chunk,))


def submits_template(options: PipelineOptions) -> bool:
    """Whether running writes a job file for a launcher (a flex template's ``--template_location``) rather than
    running the job: there is then no job here to wait for or to read counters from."""
    return bool(options.view_as(GoogleCloudOptions).template_location)


def _run_job(options: PipelineOptions, plan: BackfillPlan) -> dict[tuple[str, str], int]:
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, options, plan)
    result = pipeline.run()
    if submits_template(options):
        _log.info(
            "backfill: job written for the template launcher; its progress is the job's counters "
            "(backfill/rows_read, backfill/events_new, ...) in the Dataflow console"
        )
        return {}
    result.wait_until_finish()
    return counter_totals(result)


PROGRESS_SECONDS = 5.0


def _run_chunks_in_processes(
    options: PipelineOptions, plan: BackfillPlan, chunks: Sequence[TimeRange]
) -> dict[tuple[str, str], int]:
    """Runs the chunks in ``plan.parallel_chunks`` processes; logs the whole range's progress every 5 s: the rows
    enriched so far, and the rows of the chunks whose jobs have finished (written to every sink).

    Spawned, not forked: a fork would copy this process's gRPC and Beam threads in whatever state they are.
    The jobs count the rows they enrich into one shared counter (``ProgressLog.forward_to``).
    """
    context = multiprocessing.get_context("spawn")
    enriched = context.Value("q", 0)
    options_dict = options.get_all_options(drop_default=True, retain_unknown_options=True)
    totals: Counter[tuple[str, str]] = Counter()
    started = time.monotonic()
    workers = min(plan.parallel_chunks, len(chunks))
    _log.info("backfill: %d chunks, %d at a time, each job in a process of its own", len(chunks), workers)
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_chunk_process, initargs=(enriched,)
    ) as pool:
        pending: set[Future] = {
            pool.submit(_run_chunk_job, options_dict, plan_of_chunk(plan, chunk)) for chunk in chunks
        }
        done_chunks = 0
        while pending:
            finished, pending = wait(pending, timeout=PROGRESS_SECONDS, return_when=FIRST_EXCEPTION)
            for future in finished:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                totals.update(future.result())
                done_chunks += 1
            running = min(len(pending), workers)
            _log.info(
                "backfill: %d of %d chunks done, %d running; %s",
                done_chunks,
                len(chunks),
                running,
                progress_text(
                    enriched.value,
                    plan.summary.rows,
                    time.monotonic() - started,
                    verb="enriched",
                    written=totals[("backfill", "rows_read")],
                ),
            )
    return totals


def _start_chunk_process(enriched: Any) -> None:
    configure_logging()
    # The parent logs the whole range's progress; each job's own per-step lines would only interleave.
    logging.getLogger("transforms.postgres_source").setLevel(logging.WARNING)
    ProgressLog.forward_to("enriched", enriched)


def _run_chunk_job(options_dict: dict[str, Any], plan: BackfillPlan) -> dict[tuple[str, str], int]:
    return _run_job(PipelineOptions.from_dictionary(options_dict), plan)


def progress_text(done: int, total: int, elapsed_seconds: float, verb: str = "read", written: int | None = None) -> str:
    """``read 300000 of 1000000 rows (30.0%), 1850 rows/s, about 378s left``, for the chunks' progress.

    With ``written`` (the rows of the chunks whose jobs have finished, sinks included), the time left is the
    longer of the two estimates: once every row is enriched, what is left is the chunks still writing, and the
    rate they have written at so far says how long that takes."""
    rate = done / elapsed_seconds if elapsed_seconds > 0 else 0.0
    left: float | None = max(total - done, 0) / rate if rate > 0 else None
    if written is not None:
        if written >= total:
            left = 0.0
        elif written > 0:
            left = max(left or 0.0, (total - written) * elapsed_seconds / written)
        elif done >= total:
            left = None  # all enriched, nothing written yet: the writes' rate is not known
    eta = f"about {left:.0f}s left" if left is not None else "time left unknown"
    share = 100.0 * done / total if total else 100.0
    text = f"{verb} {done} of {total} rows ({share:.1f}%), {rate:.0f} rows/s"
    if written is not None:
        text += f", {written} written"
    return f"{text}, {eta}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    configure_logging()
    options = PipelineOptions(with_state_cache(argv))
    try:
        plan = preflight(options)
    except PreflightError as error:
        print(f"backfill: error: {error}", file=sys.stderr)
        return PREFLIGHT_EXIT_STATUS
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "BundleBasedDirectRunner"):
        _log.warning(
            "the Python DirectRunner runs this pipeline on its legacy engine, which can drop sink dead letters; "
            "use --runner=FnApiRunner (scripts/backfill does) or --runner=PrismRunner"
        )
    if plan.skip_writes:
        _log.info("backfill: --skip_writes: the graph runs in full, nothing is written to BigQuery, Redis or the API")
    _log.info(
        "backfill [%s, %s): %d rows in PostgreSQL (ids %s..%s), %d chunk(s), %d read splits, HTTP API %s",
        plan.time_range.start.isoformat(),
        plan.time_range.end.isoformat(),
        plan.summary.rows,
        plan.summary.min_id,
        plan.summary.max_id,
        len(plan.chunks),
        plan.read_splits,
        "on" if plan.sinks.http is not None else "off",
    )
    totals = run_chunks(options, plan)
    if not submits_template(options):
        log_summary(totals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
