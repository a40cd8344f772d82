"""The BigQuery sink: enriched events, window aggregates and dead letters through the Storage Write API.

Two routes write the same rows to the same tables (sql/bigquery/001_tables.sql), chosen by
``--bigquery_write_method``:

* ``storage_write_api`` (Dataflow): Beam's ``WriteToBigQuery(method=STORAGE_WRITE_API)``, a Java
  cross-language transform; exactly once unless ``--bigquery_use_at_least_once``.
* ``local_storage_write`` (local stack, tests): ``bigquery_local.WriteTableLocally``, the same API from
  Python over plaintext gRPC, exactly once through committed streams with offsets.

Each write returns the rows BigQuery refused as ``DeadLetter(stage=bigquery)`` with BigQuery's reason, and
the records that could not even be turned into rows (transforms/dead_letters.py: only that conversion is
guarded; a failing append goes through the write's own retries).
The table schemas are read from the DDL when the pipeline is built, so the SQL stays their only source.
"""

from __future__ import annotations

import json
import logging
import re
from base64 import b64encode
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.utils.timestamp import Timestamp

from transforms.dead_letters import DEAD_LETTER_TAG, GuardedMap, flatten_dead_letters
from transforms.expansion import java_expansion_service
from transforms.lists import items
from transforms.model import DeadLetter, EnrichedEvent, SourceCoordinates, Stage, WindowAggregate
from transforms.rows import Row, dead_letter_row, enriched_event_row, window_aggregate_row
from transforms.settings import add_options, option_values, setting
from transforms.sinks.bigquery_local import METRICS_NAMESPACE, LocalWriteSettings, WriteTableLocally
from transforms.sinks.bigquery_tables import Column, TableSpec

_log = logging.getLogger(__name__)

TABLES_DDL = Path(__file__).resolve().parents[2] / "sql" / "bigquery" / "001_tables.sql"

STORAGE_WRITE_API = "storage_write_api"
LOCAL_STORAGE_WRITE = "local_storage_write"
WRITE_METHODS = (STORAGE_WRITE_API, LOCAL_STORAGE_WRITE)


class BigQuerySinkOptions(PipelineOptions):
    """Where and how the pipeline writes BigQuery."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--bigquery_project",
            default=None,
            help="Project of the BigQuery dataset; defaults to --project.",
        )
        parser.add_argument(
            "--bigquery_rest_endpoint",
            default=None,
            help=(
                "REST URL of the BigQuery emulator (e.g. http://127.0.0.1:29050), where the pipeline reads what "
                "the tables hold (the backfill: ids and window values; streaming with --start_offset=resume: "
                "where the last run stopped). Unset: Google BigQuery with default credentials."
            ),
        )
        add_options(parser, BigQuerySinkSettings)


# --- schemas from the DDL -------------------------------------------------------------------------------------

_TABLE = re.compile(r"CREATE TABLE(?: IF NOT EXISTS)?\s+`[^`]*?\.?(\w+)`\s*\((.*?)\n\)", re.S)
_COLUMN = re.compile(r"^\s*(\w+)\s+(\w+)(\s+NOT NULL)?", re.M)


def parse_table_columns(ddl: str) -> dict[str, tuple[Column, ...]]:
    """Table name -> columns, from ``CREATE TABLE`` statements written one column per line (as ours are)."""
    tables: dict[str, tuple[Column, ...]] = {}
    for name, body in _TABLE.findall(ddl):
        lines = [line for line in body.splitlines() if line.strip() and not line.strip().startswith("--")]
        columns = []
        for line in lines:
            match = _COLUMN.match(line)
            if match is None:
                raise ValueError(f"cannot read a column of {name} from {line.strip()!r}")
            columns.append(Column(match.group(1), match.group(2).upper(), required=match.group(3) is not None))
        tables[name] = tuple(columns)
    if not tables:
        raise ValueError("no CREATE TABLE statement found")
    return tables


def beam_table_schema(columns: tuple[Column, ...]) -> dict[str, Any]:
    """The schema as ``WriteToBigQuery`` takes it."""
    return {
        "fields": [{"name": c.name, "type": c.type, "mode": "REQUIRED" if c.required else "NULLABLE"} for c in columns]
    }


# --- values and dead letters ----------------------------------------------------------------------------------


def to_beam_values(row: Row, columns: tuple[Column, ...]) -> Row:
    """A rows.py dict as Beam's Storage Write sink converts it to a Beam Row: TIMESTAMP as ``Timestamp``
    (microsecond precision, like the column), NUMERIC as Decimal, BYTES as bytes."""
    converted = dict(row)
    for column in columns:
        value = converted.get(column.name)
        if column.type == "TIMESTAMP" and isinstance(value, datetime):
            converted[column.name] = Timestamp.from_utc_datetime(value.astimezone(UTC))
    return converted


def _json_default(value: Any) -> Any:
    if isinstance(value, Timestamp):
        return value.to_rfc3339()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return b64encode(value).decode("ascii")
    return str(value)


def row_as_json(row: Row) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), default=_json_default, ensure_ascii=False)


def source_of(row: Row) -> SourceCoordinates:
    """Where a refused row came from, as far as the row says.

    A dead-letter row keeps its own coordinates; an event row points at its engagement_events row; an
    aggregate has no single source row and points at the events table as a whole.
    """
    if row.get("source_kind") in ("kafka", "postgres", "test"):
        return SourceCoordinates(
            kind=row["source_kind"],
            topic=row.get("source_topic"),
            partition=row.get("source_partition"),
            offset=row.get("source_offset"),
            table=row.get("source_table"),
            row_id=row.get("source_row_id"),
        )
    event_id = row.get("event_id")
    return SourceCoordinates(
        kind="postgres", table="engagement_events", row_id=event_id if isinstance(event_id, int) else None
    )


def refused_row_dead_letter(table: str, row_json: str, reason: str) -> DeadLetter:
    row = json.loads(row_json)
    event_id = row.get("event_id")
    return DeadLetter.of(
        Stage.BIGQUERY,
        f"{table}: {reason}",
        row_json.encode("utf-8"),
        source_of(row),
        event_id=event_id if isinstance(event_id, int) else None,
    )


# --- settings and transforms ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigQuerySinkSettings:
    project: str
    """``--bigquery_project``, else ``--project``."""
    dataset: str = setting(
        flag="--bigquery_dataset",
        option_default="engagement",
        help="Dataset holding the pipeline's tables.",
    )
    events_table: str = setting(
        "enriched_events",
        flag="--bigquery_events_table",
        help="Table of enriched events (one row per event; see sql/bigquery/001_tables.sql).",
    )
    aggregates_table: str = setting(
        "window_aggregates",
        flag="--bigquery_aggregates_table",
        help="Table of per-content window aggregates (panes coalesced per --bigquery_pane_interval_seconds).",
    )
    pane_interval_seconds: int = setting(
        10,
        flag="--bigquery_pane_interval_seconds",
        type=int,
        help=(
            "Streaming: window_aggregates gets at most one pane per window and content per this many "
            "seconds, the newest, and the final value when the window closes (Redis gets every pane); 0 "
            "writes every pane."
        ),
    )
    dead_letters_table: str = setting(
        "dead_letters",
        flag="--bigquery_dead_letters_table",
        help="Table of dead letters from every stage.",
    )
    write_method: str = setting(
        STORAGE_WRITE_API,
        flag="--bigquery_write_method",
        choices=WRITE_METHODS,
        help=(
            "'storage_write_api': Beam's Java Storage Write API sink (Dataflow). 'local_storage_write': "
            "the Python Storage Write API writer for the BigQuery emulator (needs --bigquery_endpoint)."
        ),
    )
    endpoint: str | None = setting(
        None,
        flag="--bigquery_endpoint",
        help="host:port of a plaintext Storage Write API (the emulator's gRPC port); local_storage_write only.",
    )
    use_at_least_once: bool = setting(
        False,
        flag="--bigquery_use_at_least_once",
        action="store_true",
        help=(
            "storage_write_api only: write through the default stream, at least once. Cheaper and lower "
            "latency; a retried bundle may duplicate rows (the *_unique/_current views hide them)."
        ),
    )
    num_streams: int = setting(
        0,
        flag="--bigquery_num_streams",
        type=int,
        help=(
            "Write streams per table. storage_write_api: 0 lets the runner choose (with auto-sharding); "
            "local_storage_write: 0 means 1 in streaming, where each stream appends at least once per "
            "--bigquery_triggering_frequency_seconds, and 4 in batch."
        ),
    )
    auto_sharding: bool = setting(
        False,
        flag="--bigquery_auto_sharding",
        action="store_true",
        help="storage_write_api, streaming only: let the runner scale the number of streams with load.",
    )
    triggering_frequency_seconds: float = setting(
        5.0,
        flag="--bigquery_triggering_frequency_seconds",
        type=float,
        help=(
            "Streaming: how often buffered rows are committed, in seconds. Lower means fresher tables and "
            "more, smaller appends. The local writer holds a stream's rows for at most this long (or until "
            "--bigquery_batch_size); 0 makes it append each bundle's rows when the bundle ends."
        ),
    )
    batch_size: int = setting(
        5000,
        flag="--bigquery_batch_size",
        type=int,
        help=(
            "local_storage_write: at most this many rows per AppendRows request (and never over 10 MB). Fewer, "
            "larger appends cost the emulator less CPU."
        ),
    )
    create_disposition: str = setting(
        BigQueryDisposition.CREATE_NEVER,
        flag="--bigquery_create_disposition",
        choices=[BigQueryDisposition.CREATE_NEVER, BigQueryDisposition.CREATE_IF_NEEDED],
        help=(
            "CREATE_NEVER (default): the tables must exist (scripts/bigquery-ddl creates them partitioned "
            "and clustered). CREATE_IF_NEEDED (storage_write_api only) creates them without partitioning."
        ),
    )
    write_disposition: str = setting(
        BigQueryDisposition.WRITE_APPEND,
        flag="--bigquery_write_disposition",
        choices=[
            BigQueryDisposition.WRITE_APPEND,
            BigQueryDisposition.WRITE_EMPTY,
            BigQueryDisposition.WRITE_TRUNCATE,
        ],
        help="WRITE_APPEND (default); WRITE_EMPTY and WRITE_TRUNCATE are for batch storage_write_api runs only.",
    )
    expansion_service: str | None = setting(
        None,
        flag="--bigquery_expansion_service",
        help=(
            "storage_write_api: address (host:port) of a running expansion service for the Java sink, a jar "
            "path, or empty for the jar scripts/fetch-beam-artifacts fetched for this Beam version."
        ),
    )
    streaming: bool = False
    ddl_path: Path = TABLES_DDL

    def __post_init__(self) -> None:
        if self.pane_interval_seconds < 0:
            raise ValueError("bigquery_pane_interval_seconds must not be negative")
        if self.write_method not in WRITE_METHODS:
            raise ValueError(f"bigquery_write_method must be one of {WRITE_METHODS}, not {self.write_method!r}")
        if self.write_method == LOCAL_STORAGE_WRITE:
            if not self.endpoint:
                raise ValueError("local_storage_write needs --bigquery_endpoint host:port")
            if self.create_disposition != BigQueryDisposition.CREATE_NEVER:
                raise ValueError("local_storage_write does not create tables: run scripts/bigquery-ddl first")
            if self.write_disposition != BigQueryDisposition.WRITE_APPEND:
                raise ValueError("local_storage_write only appends (WRITE_APPEND)")

    @classmethod
    def from_options(cls, options: PipelineOptions) -> BigQuerySinkSettings:
        sink = options.view_as(BigQuerySinkOptions)
        project = sink.bigquery_project or options.view_as(GoogleCloudOptions).project
        if not project:
            raise ValueError("set --bigquery_project (or --project)")
        return cls(project=project, streaming=options.view_as(StandardOptions).streaming, **option_values(cls, sink))

    def table_spec(self, ddl_table: str, table: str) -> TableSpec:
        """``table`` (possibly renamed by an option) with the columns of ``ddl_table`` in the DDL."""
        columns = parse_table_columns(self.ddl_path.read_text())
        return TableSpec(self.project, self.dataset, table, columns[ddl_table])


class WriteRows(beam.PTransform):
    """Writes rows.py dicts to one table; returns the dead letters of the rows BigQuery refused.

    ``row_lists``: the input holds lists of rows (``transforms/lists.py``)."""

    def __init__(self, spec: TableSpec, settings: BigQuerySinkSettings, row_lists: bool = False) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings
        self._row_lists = row_lists

    def expand(self, rows: beam.PCollection[Row]) -> beam.PCollection[DeadLetter]:
        if self._settings.write_method == LOCAL_STORAGE_WRITE:
            refused = rows | "Storage Write (local)" >> WriteTableLocally(
                self._spec, self._local_settings(), row_lists=self._row_lists
            )
        else:
            if self._row_lists:
                rows = rows | "Rows of lists" >> beam.FlatMap(items)
            refused = rows | "Storage Write (Beam)" >> _BeamStorageWrite(self._spec, self._settings)
        table = self._spec.table
        return refused | "Refused rows to dead letters" >> beam.MapTuple(
            lambda row_json, reason: refused_row_dead_letter(table, row_json, reason)
        )

    def _local_settings(self) -> LocalWriteSettings:
        return LocalWriteSettings(
            endpoint=self._settings.endpoint,
            # The emulator spends about 0.1 s of CPU on an append whatever its size (docs/benchmarks.md), and in
            # streaming every stream appends once per triggering period: one stream, in few large appends,
            # keeps up with 7,000 rows a second there. A backfill's chunks append in parallel, on four.
            num_shards=self._settings.num_streams or (1 if self._settings.streaming else 4),
            batch_size=self._settings.batch_size,
            streaming=self._settings.streaming,
            max_buffering_seconds=self._settings.triggering_frequency_seconds,
        )


class _BeamStorageWrite(beam.PTransform):
    """Beam's cross-language Storage Write sink; emits (row JSON, BigQuery's error) for refused rows."""

    def __init__(self, spec: TableSpec, settings: BigQuerySinkSettings) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings

    def write_transform(self) -> WriteToBigQuery:
        spec, settings = self._spec, self._settings
        streaming_only: dict[str, Any] = {}
        if settings.streaming:
            # The Java sink refuses a triggering frequency and auto-sharding in batch pipelines.
            streaming_only = {
                "triggering_frequency": settings.triggering_frequency_seconds,
                "with_auto_sharding": settings.auto_sharding,
            }
        return WriteToBigQuery(
            table=f"{spec.project}:{spec.dataset}.{spec.table}",
            schema=beam_table_schema(spec.columns),
            method=WriteToBigQuery.Method.STORAGE_WRITE_API,
            create_disposition=settings.create_disposition,
            write_disposition=settings.write_disposition,
            use_at_least_once=settings.use_at_least_once,
            num_storage_api_streams=settings.num_streams,
            expansion_service=java_expansion_service(settings.expansion_service, "gcp"),
            **streaming_only,
        )

    def expand(self, rows: beam.PCollection[Row]) -> beam.PCollection[tuple[str, str]]:
        spec = self._spec
        values = rows | "Beam values" >> GuardedMap(
            Stage.BIGQUERY, f"{spec.table}.beam_values", to_beam_values, spec.columns
        )
        result = values.converted | "WriteToBigQuery" >> self.write_transform()
        dead = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.dead_lettered")

        def refused(failed: dict[str, Any]) -> tuple[str, str]:
            dead.inc()
            return row_as_json(failed["failed_row"]), failed["error_message"]

        unconvertible = values[DEAD_LETTER_TAG] | "Unconvertible rows" >> beam.Map(
            lambda dead_letter: (dead_letter.payload_text, dead_letter.reason)
        )
        failed = result.failed_rows_with_errors | "Failed rows" >> beam.Map(refused)
        return (failed, unconvertible) | "Refused rows" >> beam.Flatten()


def _stamp_processed_at(enriched: EnrichedEvent) -> Row:
    # Stamped before the sink's shuffle, so a replayed batch carries the same value.
    return enriched_event_row(enriched, processed_at=datetime.now(UTC))


class WriteEnrichedEvents(beam.PTransform):
    def __init__(self, settings: BigQuerySinkSettings, event_lists: bool = False) -> None:
        """``event_lists``: the input holds lists of events (``transforms/lists.py``)."""
        super().__init__()
        self._settings = settings
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> beam.PCollection[DeadLetter]:
        spec = self._settings.table_spec("enriched_events", self._settings.events_table)
        lists = self._event_lists
        rows = events | "Event rows" >> GuardedMap(
            Stage.BIGQUERY, f"{spec.table}.rows", _stamp_processed_at, lists=lists
        )
        refused = rows.converted | f"Write {spec.table}" >> WriteRows(spec, self._settings, row_lists=lists)
        return flatten_dead_letters(f"{spec.table} dead letters", rows[DEAD_LETTER_TAG], refused)


class WriteWindowAggregates(beam.PTransform):
    """Writes the panes it is given: in streaming, the core's coalesced ones (``CoreOutputs.coalesced_aggregates``)."""

    def __init__(self, settings: BigQuerySinkSettings) -> None:
        super().__init__()
        self._settings = settings

    def expand(self, aggregates: beam.PCollection[WindowAggregate]) -> beam.PCollection[DeadLetter]:
        settings = self._settings
        spec = settings.table_spec("window_aggregates", settings.aggregates_table)
        rows = aggregates | "Aggregate rows" >> GuardedMap(Stage.BIGQUERY, f"{spec.table}.rows", window_aggregate_row)
        refused = rows.converted | f"Write {spec.table}" >> WriteRows(spec, settings)
        return flatten_dead_letters(f"{spec.table} dead letters", rows[DEAD_LETTER_TAG], refused)


class WriteDeadLetters(beam.PTransform):
    """Writes dead letters; returns those the table refused, which are logged (never re-routed to it)."""

    def __init__(self, settings: BigQuerySinkSettings) -> None:
        super().__init__()
        self._settings = settings

    def expand(self, dead_letters: beam.PCollection[DeadLetter]) -> beam.PCollection[DeadLetter]:
        spec = self._settings.table_spec("dead_letters", self._settings.dead_letters_table)
        rows = dead_letters | "Dead-letter rows" >> GuardedMap(Stage.BIGQUERY, f"{spec.table}.rows", dead_letter_row)
        refused = rows.converted | f"Write {spec.table}" >> WriteRows(spec, self._settings)
        unwritable = flatten_dead_letters(f"{spec.table} unwritable", rows[DEAD_LETTER_TAG], refused)
        return unwritable | "Log unwritable dead letters" >> beam.Map(_log_unwritable)


def _log_unwritable(dead_letter: DeadLetter) -> DeadLetter:
    # Sending it back to the table that refused it would loop; the log and the counter keep it visible.
    _log.error("dead letter could not be written to BigQuery: %s (%s)", dead_letter.reason, dead_letter.payload_text)
    return dead_letter
