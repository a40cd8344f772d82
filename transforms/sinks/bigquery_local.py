"""Exactly-once writes through the BigQuery Storage Write API from Python, for the local stack and tests.

Beam's own Storage Write sink is a Java cross-language transform: it needs a Java SDK harness and opens TLS
gRPC channels with Google credentials, so it cannot reach the emulator (see docs/bigquery.md). This module
writes the same rows through ``BigQueryWriteClient`` instead.

Rows are encoded to protobuf before the shuffle and keyed by shard; each shard appends to one COMMITTED write
stream created when the pipeline is built, at explicit offsets, so a replayed append finds ALREADY_EXISTS
instead of writing a second copy. Rows the table refuses (``row_errors``) become dead letters; a refused
request writes nothing, and its valid rest is re-sent at the same offset.

Batch (``AppendGroupFn``): ``GroupByKey`` makes one group per shard. The runner persists it, so a retried
bundle iterates the same rows in the same order and re-sends the same chunks at the same offsets, counted from
0. No state and no timers: nothing depends on the global window still being open when the last rows arrive.
On ALREADY_EXISTS the writer learns which rows of the chunk the table refuses from a *probe* (the chunk plus
a row that is always refused, sent to a stream that never holds rows), so a replay emits the same dead
letters and advances by the same number of rows as the attempt it repeats.

Streaming (``BatchAcrossBundles`` + ``AppendBatchesFn``): rows are batched per shard across bundles, for at
most ``--bigquery_triggering_frequency_seconds`` (transforms/batching.py: per-bundle lists, not rows, enter
the grouping state), and a stateful DoFn keeps each shard's next offset. The global window never closes in
streaming. Each append costs the emulator a fixed overhead whatever its size, so batches that span bundles
keep its CPU down; a triggering frequency of 0 appends each bundle's rows when the bundle ends instead.

1. Batches are stable across retries: the runner commits the batching bundle's output before the appending
   stage, keyed by shard behind a shuffle, reads it.
2. The offset in state advances only with the bundle's commit, so the offset sequence never skips or repeats.
3. After a refusal, the valid rest of the batch is parked in state and appended by a later bundle, once the
   dead letters are committed (see ``AppendBatchesFn``).
"""

from __future__ import annotations

import json
import logging
import uuid
import zlib
from base64 import b64encode
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, TypeVar

import apache_beam as beam
import grpc
import tenacity
from apache_beam.coders import BytesCoder, IterableCoder, StrUtf8Coder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory
from google.rpc import code_pb2

from transforms.batching import BatchAcrossBundles, BatchWithinBundleFn
from transforms.instants import EPOCH, epoch_micros
from transforms.retry import Backoff, retrying
from transforms.sinks.bigquery_tables import Column, TableSpec
from transforms.state_cache import measure_cached_state_cheaply

_log = logging.getLogger(__name__)

T = TypeVar("T")

METRICS_NAMESPACE = "sink.bigquery"

# AppendRows accepts up to 10 MB per request; gRPC's default 4 MB cap would refuse big batches first.
_MAX_MESSAGE_BYTES = 20 * 1024 * 1024

_FieldType = descriptor_pb2.FieldDescriptorProto.Type
# How the Storage Write API expects each BigQuery type in a proto row.
_PROTO_TYPES: dict[str, int] = {
    "INT64": _FieldType.TYPE_INT64,
    "STRING": _FieldType.TYPE_STRING,
    "NUMERIC": _FieldType.TYPE_STRING,  # decimal text: exact, no float rounding
    "BIGNUMERIC": _FieldType.TYPE_STRING,
    "JSON": _FieldType.TYPE_STRING,
    "TIMESTAMP": _FieldType.TYPE_INT64,  # microseconds since the epoch
    "DATE": _FieldType.TYPE_INT32,  # days since the epoch
    "BOOL": _FieldType.TYPE_BOOL,
    "BYTES": _FieldType.TYPE_BYTES,
    "FLOAT64": _FieldType.TYPE_DOUBLE,
}


# --- rows as protobuf -----------------------------------------------------------------------------------------


def build_message_class(name: str, fields: Iterable[tuple[str, int]], package: str = "sink") -> type[message.Message]:
    """A proto2 message class named ``name`` with one optional field per (field name, proto type), in order.

    proto2 ``optional`` gives every field presence, so None is written as NULL; proto3 scalars would be
    written as 0 or "".
    """
    file_proto = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package=package, syntax="proto2")
    message_proto = file_proto.message_type.add(name=name)
    for number, (field_name, field_type) in enumerate(fields, start=1):
        message_proto.field.add(
            name=field_name,
            number=number,
            type=field_type,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    # A private pool per class: the default pool refuses a second definition of the same name.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))


def proto_message_class(spec: TableSpec) -> type[message.Message]:
    """The message class of ``spec``'s rows: one optional field per column, in table order.

    REQUIRED columns are optional here too: the table, not the encoder, enforces them, and its row error is
    what the dead letter reports.
    """
    name = "".join(part.capitalize() for part in spec.table.split("_")) + "Row"
    return build_message_class(name, ((column.name, _PROTO_TYPES[column.type]) for column in spec.columns))


def writer_schema(message_class: type[message.Message]) -> types.ProtoSchema:
    descriptor = descriptor_pb2.DescriptorProto()
    message_class.DESCRIPTOR.CopyToProto(descriptor)
    return types.ProtoSchema(proto_descriptor=descriptor)


def timestamp_micros(value: datetime | Timestamp) -> int:
    if isinstance(value, Timestamp):
        return value.micros
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: a TIMESTAMP needs a UTC offset")
    return epoch_micros(value)


def _numeric_text(value: Any) -> str:
    if not isinstance(value, Decimal | int):
        raise TypeError(f"NUMERIC needs a Decimal or int, not {type(value).__name__}")
    # Fixed-point text: str(Decimal) may use an exponent ("1E+3"), which BigQuery reads differently.
    return format(value if isinstance(value, Decimal) else Decimal(value), "f")


def _date_days(value: date) -> int:
    return (value - EPOCH.date()).days


def _json_text(value: Any) -> Any:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "TIMESTAMP": timestamp_micros,
    "NUMERIC": _numeric_text,
    "BIGNUMERIC": _numeric_text,
    "DATE": _date_days,
    "JSON": _json_text,
}


def proto_value(column: Column, value: Any) -> Any:
    """One row value as the proto field of ``column`` expects it."""
    return _converted(column.name, _CONVERTERS.get(column.type), value)


def _converted(name: str, convert: Callable[[Any], Any] | None, value: Any) -> Any:
    if convert is None:
        return value
    try:
        return convert(value)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from error


class RowEncoder:
    """Serializes row dicts of rows.py as one table's proto; NULLs are left unset.

    The table's columns and converters are worked out once: looking them up per row by the table's spec
    hashed and compared the whole spec each time, 7 % of a backfill job's CPU (docs/benchmarks.md)."""

    def __init__(self, message_class: type[message.Message], spec: TableSpec) -> None:
        self._message_class = message_class
        self._table = spec.table
        self._names = frozenset(column.name for column in spec.columns)
        self._layout = tuple((column.name, _CONVERTERS.get(column.type)) for column in spec.columns)

    def __call__(self, row: dict[str, Any]) -> bytes:
        if not self._names.issuperset(row):
            raise ValueError(f"columns not in {self._table}: {sorted(set(row) - self._names)}")
        fields = {}
        for name, convert in self._layout:
            value = row.get(name)
            if value is not None:
                fields[name] = _converted(name, convert, value)
        return self._message_class(**fields).SerializeToString()


def encode_row(message_class: type[message.Message], spec: TableSpec, row: dict[str, Any]) -> bytes:
    """``row`` (a dict of rows.py) serialized as the table's proto; for one row (a hot path uses ``RowEncoder``)."""
    return RowEncoder(message_class, spec)(row)


def _json_value(column: Column, value: Any) -> Any:
    if column.type == "TIMESTAMP":
        return (EPOCH + timedelta(microseconds=value)).isoformat()
    if column.type == "BYTES":
        return b64encode(value).decode("ascii")
    return value


def row_json(message_class: type[message.Message], spec: TableSpec, encoded: bytes) -> str:
    """A rejected row as readable JSON for its dead letter (timestamps ISO-8601, bytes base64)."""
    decoded = message_class.FromString(encoded)
    document = {
        column.name: _json_value(column, getattr(decoded, column.name)) if decoded.HasField(column.name) else None
        for column in spec.columns
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stream_of_row(encoded: bytes, num_shards: int) -> int:
    """The write stream (shard) of an encoded row: the same row lands on the same stream whichever worker
    encodes it. (The HTTP sink's ``shard_of_event`` shards event ids into batches: another purpose.)"""
    return zlib.crc32(encoded) % num_shards


MAX_REQUEST_BYTES = 9 * 1024 * 1024
"""Rows per AppendRows request stop short of this: the API refuses requests over 10 MB."""


def chunked(items: Iterable[bytes], size: int, max_bytes: int = MAX_REQUEST_BYTES) -> Iterator[list[bytes]]:
    """``items`` in lists of at most ``size`` items and ``max_bytes`` bytes (a larger item is a list of its own),
    read lazily: a shard's group may not fit in memory."""
    if size < 1:
        raise ValueError(f"chunk size must be positive, not {size}")
    chunk: list[bytes] = []
    chunk_bytes = 0
    for item in items:
        if chunk and chunk_bytes + len(item) > max_bytes:
            yield chunk
            chunk, chunk_bytes = [], 0
        chunk.append(item)
        chunk_bytes += len(item)
        if len(chunk) == size:
            yield chunk
            chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


def refusal_sentinel(spec: TableSpec) -> bytes:
    """A row ``spec``'s table always refuses: the empty message, which leaves every REQUIRED column NULL.

    A probe request ends with it, so the table refuses the whole request and writes nothing, while its
    ``row_errors`` still name every other row it would refuse.
    """
    if not any(column.required for column in spec.columns):
        raise ValueError(f"{spec.table} has no REQUIRED column: no row is sure to be refused, so it cannot be probed")
    return b""


# --- the Storage Write API ------------------------------------------------------------------------------------


def insecure_write_client(endpoint: str) -> BigQueryWriteClient:
    """A write client over plaintext gRPC to ``host:port`` (the emulator).

    Passing the endpoint through ``client_options`` instead would make the client speak TLS to a plaintext
    port, fail the handshake and retry silently for minutes.
    """
    channel = grpc.insecure_channel(
        endpoint,
        options=(
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ),
    )
    return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=channel))


class Outcome(Enum):
    WRITTEN = "written"
    ALREADY_WRITTEN = "already_written"
    ROWS_REJECTED = "rows_rejected"
    STREAM_GONE = "stream_gone"
    TRANSIENT = "transient"
    FATAL = "fatal"


_TRANSIENT_CODES = frozenset(
    {
        code_pb2.UNAVAILABLE,
        code_pb2.INTERNAL,
        code_pb2.ABORTED,
        code_pb2.RESOURCE_EXHAUSTED,
        code_pb2.DEADLINE_EXCEEDED,
        code_pb2.CANCELLED,
        code_pb2.UNKNOWN,
    }
)


def classify(response: types.AppendRowsResponse) -> Outcome:
    """What an AppendRows response means for the batch that was sent (errors arrive in-band, not raised)."""
    if "error" not in response or response.error.code == code_pb2.OK:
        return Outcome.WRITTEN
    code = response.error.code
    if code == code_pb2.ALREADY_EXISTS:
        # Our offset is behind the stream's end: an earlier attempt of this batch was written.
        return Outcome.ALREADY_WRITTEN
    if code == code_pb2.INVALID_ARGUMENT and response.row_errors:
        return Outcome.ROWS_REJECTED
    if code in (code_pb2.NOT_FOUND, code_pb2.FAILED_PRECONDITION):
        # Finalized, expired or deleted stream: a new one must take over.
        return Outcome.STREAM_GONE
    if code in _TRANSIENT_CODES:
        return Outcome.TRANSIENT
    # INVALID_ARGUMENT without row errors (a schema mismatch), OUT_OF_RANGE (our offset is past the end),
    # PERMISSION_DENIED, ...: retrying cannot help and guessing could lose or duplicate rows.
    return Outcome.FATAL


def rejected_rows(response: types.AppendRowsResponse) -> dict[int, str]:
    """Index in the request -> BigQuery's reason, for each row the table refused."""
    return {
        error.index: f"BigQuery rejected the row ({types.RowError.RowErrorCode(error.code).name}): {error.message}"
        for error in response.row_errors
    }


@dataclass(frozen=True)
class StreamPosition:
    """Where a shard writes next: its COMMITTED stream and the offset of the next row."""

    stream: str
    offset: int


@dataclass
class AppendResult:
    """What one batch's append did. ``rejected`` (index -> BigQuery's reason) is non-empty only for
    ROWS_REJECTED, in which case nothing of the batch was written."""

    outcome: Outcome
    rejected: dict[int, str] = field(default_factory=dict)
    retries: int = 0


class StorageWriteError(RuntimeError):
    """An append that retrying in place cannot fix; the bundle fails and the runner retries it."""


_TRANSIENT_APPEND_ERRORS = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.Aborted,
    api_exceptions.InternalServerError,
    api_exceptions.TooManyRequests,
)
_APPEND_BACKOFF = Backoff(initial_seconds=0.2, max_seconds=10.0)


class TableAppender:
    """Appends batches of encoded rows to one table's COMMITTED streams at explicit offsets."""

    def __init__(
        self,
        client: BigQueryWriteClient,
        spec: TableSpec,
        message_class: type[message.Message],
        max_attempts: int = 6,
        backoff: Backoff = _APPEND_BACKOFF,
    ) -> None:
        self._client = client
        self._spec = spec
        self._schema = writer_schema(message_class)
        self._max_attempts = max_attempts
        self._backoff = backoff

    def create_stream(self) -> str:
        parent = self._client.table_path(self._spec.project, self._spec.dataset, self._spec.table)
        stream = types.WriteStream(type_=types.WriteStream.Type.COMMITTED)
        return self._client.create_write_stream(parent=parent, write_stream=stream).name

    def _append_once(self, position: StreamPosition, rows: Sequence[bytes]) -> types.AppendRowsResponse:
        request = types.AppendRowsRequest(
            write_stream=position.stream,
            offset=position.offset,
            proto_rows=types.AppendRowsRequest.ProtoData(
                writer_schema=self._schema,
                rows=types.ProtoRows(serialized_rows=list(rows)),
            ),
        )
        # One self-contained request per call. append_rows() blocks until the first response, so a
        # request iterator must already hold its first request when the call is made: a one-element list
        # does, a queue filled afterwards would deadlock.
        responses = list(self._client.append_rows(iter([request])))
        if len(responses) != 1:
            raise StorageWriteError(f"expected one AppendRows response, got {len(responses)}")
        return responses[0]

    def append(self, position: StreamPosition, rows: Sequence[bytes]) -> AppendResult:
        """Appends all of ``rows`` at ``position``, or nothing; transient failures are retried here.

        WRITTEN: ``rows`` are in the table. ALREADY_WRITTEN: an earlier append landed at this offset (what it
        held is the caller's to know; see ``AppendGroupFn``). Any other outcome wrote nothing.
        """
        retry = retrying(
            tenacity.retry_if_result(lambda answer: answer[0] is Outcome.TRANSIENT),
            self._backoff,
            attempts=self._max_attempts,
        )
        try:
            outcome, response = retry(self._attempt, position, rows)
        except tenacity.RetryError as error:
            raise StorageWriteError(
                f"append to {position.stream} still failing after {self._max_attempts} tries"
            ) from error
        retries = retry.statistics.get("attempt_number", 1) - 1
        if outcome is Outcome.ROWS_REJECTED:
            return AppendResult(outcome, rejected_rows(response), retries=retries)
        if outcome is Outcome.FATAL:
            raise StorageWriteError(
                f"append to {self._spec.table_id} at offset {position.offset} failed: "
                f"code {response.error.code}: {response.error.message}"
            )
        return AppendResult(outcome, retries=retries)

    def _attempt(
        self, position: StreamPosition, rows: Sequence[bytes]
    ) -> tuple[Outcome, types.AppendRowsResponse | None]:
        try:
            response = self._append_once(position, rows)
        except _TRANSIENT_APPEND_ERRORS as error:
            _log.warning("append to %s failed: %s", position.stream, error)
            return Outcome.TRANSIENT, None
        return classify(response), response

    def refused_rows(self, probe_stream: str, rows: Sequence[bytes]) -> tuple[dict[int, str], int]:
        """Index in ``rows`` -> reason, for each row the table refuses, learned without writing anything.

        Each request is ``rows`` (less those already known to be refused) and the refusal sentinel, at offset 0
        of ``probe_stream``: a COMMITTED stream nothing is ever written to, so the table validates the rows
        (the emulator checks the offset first) and refuses the request. Repeated until only the sentinel is
        refused, in case a response names only some of the bad rows. Returns the refusals and the retries.
        """
        sentinel = refusal_sentinel(self._spec)
        refused: dict[int, str] = {}
        retries = 0
        while True:
            candidates = [index for index in range(len(rows)) if index not in refused]
            result = self.append(StreamPosition(probe_stream, 0), [*(rows[i] for i in candidates), sentinel])
            retries += result.retries
            if result.outcome is not Outcome.ROWS_REJECTED or len(candidates) not in result.rejected:
                # Anything else means rows may have been written: stop rather than guess.
                raise StorageWriteError(f"probe of {self._spec.table_id} was not refused: {result.outcome.value}")
            found = {candidates[i]: reason for i, reason in result.rejected.items() if i != len(candidates)}
            if not found:
                return refused, retries
            refused.update(found)


# --- the Beam transform ---------------------------------------------------------------------------------------


class EncodeRowsFn(beam.DoFn):
    """Row dicts -> (shard, proto bytes); a row that cannot be encoded at all goes to REJECTED."""

    REJECTED = "rejected"

    def __init__(self, spec: TableSpec, num_shards: int) -> None:
        self._spec = spec
        self._num_shards = num_shards
        self._encode: RowEncoder | None = None
        self._rejected = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.encode_rejected")

    def setup(self) -> None:
        # Generated message classes do not pickle; each worker builds its own.
        self._encode = RowEncoder(proto_message_class(self._spec), self._spec)

    def process(self, row: dict[str, Any]) -> Iterator[Any]:
        try:
            encoded = self._encode(row)
        except Exception as error:  # noqa: BLE001 - a pure conversion: its failure is the row's (dead_letters.py)
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, (row, f"row cannot be encoded for {self._spec.table}: {error}")
            )
            return
        yield stream_of_row(encoded, self._num_shards), encoded


_PARKED_CODER = TupleCoder([StrUtf8Coder(), IterableCoder(BytesCoder())])


class _AppendFn(beam.DoFn):
    """Owns a write client per worker and the writer's metrics."""

    def __init__(self, spec: TableSpec, endpoint: str) -> None:
        self._spec = spec
        self._endpoint = endpoint
        self._client: BigQueryWriteClient | None = None
        self._appender: TableAppender | None = None
        self._written = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.rows_written")
        self._already = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.rows_already_written")
        self._retried = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.retried")
        self._dead = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.dead_lettered")
        self._batches = Metrics.distribution(METRICS_NAMESPACE, f"{spec.table}.batch_rows")

    def setup(self) -> None:
        measure_cached_state_cheaply()
        self._client = insecure_write_client(self._endpoint)
        self._appender = TableAppender(self._client, self._spec, proto_message_class(self._spec))

    def teardown(self) -> None:
        if self._client is not None:
            self._client.transport.close()

    def _refuse(self, rows: Sequence[bytes], rejected: dict[int, str]) -> Iterator[tuple[bytes, str]]:
        self._dead.inc(len(rejected))
        for index, reason in sorted(rejected.items()):
            yield rows[index], reason


class AppendGroupFn(_AppendFn):
    """Batch: appends one shard's group, in chunks, to the shard's stream at offsets counted from 0.

    Each stream receives exactly one group (streams are created per pipeline run, one group per shard in
    the global window). The group is persisted by the runner, so a retry re-sends the same chunks at the
    same offsets. Per chunk:

    - WRITTEN: the offset advances by the chunk.
    - ROWS_REJECTED: nothing was written; the refused rows are emitted as (row, reason) and the valid rest
      is re-sent at the same offset.
    - ALREADY_EXISTS: an earlier attempt of this group wrote here what the table accepted of this chunk:
      all of it, the rest after refusals, or nothing (then the next chunk's rows are what occupy the
      offset). The emulator checks the offset before the rows, so the answer does not say which; a probe
      (``TableAppender.refused_rows``) does, without writing. The refused rows are emitted again and the
      offset advances by the rest, exactly as in the attempt being repeated.

    Emits (encoded row, BigQuery's reason) for each row the table refuses.
    """

    def __init__(
        self, spec: TableSpec, endpoint: str, streams: Sequence[str], probe_stream: str, batch_size: int
    ) -> None:
        super().__init__(spec, endpoint)
        refusal_sentinel(spec)  # fails at build time for a table that could not be probed
        self._streams = tuple(streams)
        self._probe_stream = probe_stream
        self._batch_size = batch_size

    def process(self, element: tuple[int, Iterable[bytes]]) -> Iterator[tuple[bytes, str]]:
        shard, rows = element
        stream, offset = self._streams[shard], 0
        for chunk in chunked(rows, self._batch_size):
            offset = yield from self._append_chunk(StreamPosition(stream, offset), chunk)

    def _append_chunk(self, position: StreamPosition, chunk: list[bytes]) -> Generator[tuple[bytes, str], None, int]:
        """Appends what the table accepts of ``chunk`` at ``position``; yields rejects; returns the next offset."""
        pending = chunk
        while pending:
            result = self._appender.append(position, pending)
            self._retried.inc(result.retries)
            if result.outcome is Outcome.WRITTEN:
                self._written.inc(len(pending))
                self._batches.update(len(pending))
                return position.offset + len(pending)
            if result.outcome is Outcome.ALREADY_WRITTEN:
                refused, retries = self._appender.refused_rows(self._probe_stream, pending)
                self._retried.inc(retries)
                yield from self._refuse(pending, refused)
                self._already.inc(len(pending) - len(refused))
                return position.offset + len(pending) - len(refused)
            if result.outcome is Outcome.STREAM_GONE:
                raise StorageWriteError(f"write stream {position.stream} is gone; run the pipeline again")
            yield from self._refuse(pending, result.rejected)
            pending = [row for index, row in enumerate(pending) if index not in result.rejected]
        return position.offset


class AppendBatchesFn(_AppendFn):
    """Streaming: per shard, appends each batch to the shard's stream at the offset held in state.

    Emits (encoded row, BigQuery's reason) for each row the table refuses. A refused request writes
    nothing; the valid rest of the batch is parked in state and appended in a later bundle, once this
    bundle (with its dead letters) is committed. Appending it at once would make a replay ambiguous: the
    replay's first request, the whole batch, would get ALREADY_EXISTS without saying that some of its rows
    had been refused. Parked this way, a replayed append re-sends exactly the same rows at the same offset.

    A parked batch goes out with the next batch of its shard that arrives in a later bundle, or from an
    event-time timer if none does. Batches that arrive behind a parked one in the same bundle wait too, so
    each stream receives its rows in order.

    Not for bounded runs: there ``GroupIntoBatches`` flushes its last batches from a timer set past the end
    of the global window, by when a runner may have garbage-collected this DoFn's state (Prism does), and an
    offset read back as 0 turns the append of new rows into ALREADY_EXISTS, counted as written.
    """

    OFFSET = ReadModifyWriteStateSpec("offset", VarIntCoder())
    PARKED = BagStateSpec("parked", _PARKED_CODER)
    # Event time: outputs of a processing-time timer in a bounded run would be late and dropped.
    FLUSH_PARKED = TimerSpec("flush_parked", TimeDomain.WATERMARK)

    def __init__(self, spec: TableSpec, endpoint: str, streams: Sequence[str]) -> None:
        super().__init__(spec, endpoint)
        # One COMMITTED stream per shard, created when the pipeline was built: a stream created inside a
        # bundle would be lost with it, and the retry would write the same rows into a second stream.
        self._streams = tuple(streams)
        self._bundle = ""

    def start_bundle(self) -> None:
        # Tells batches parked by this bundle (not committed yet) from those parked by committed ones.
        self._bundle = uuid.uuid4().hex

    def process(
        self,
        element: tuple[int, Iterable[bytes]],
        offset: Any = beam.DoFn.StateParam(OFFSET),
        parked: Any = beam.DoFn.StateParam(PARKED),
        flush: Any = beam.DoFn.TimerParam(FLUSH_PARKED),
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[tuple[bytes, str]]:
        shard, batch = element
        stream = self._streams[shard]
        waiting = list(parked.read())
        if any(bundle == self._bundle for bundle, _ in waiting):
            waiting.append((self._bundle, list(batch)))
        else:
            waiting = yield from self._append_in_order(stream, [*waiting, (self._bundle, list(batch))], offset)
        # Timer outputs carry the timer's timestamp, which must lie inside the window.
        self._park(waiting, parked, flush, min(timestamp, window.max_timestamp()))

    @on_timer(FLUSH_PARKED)
    def flush_parked(
        self,
        key: int = beam.DoFn.KeyParam,
        offset: Any = beam.DoFn.StateParam(OFFSET),
        parked: Any = beam.DoFn.StateParam(PARKED),
        flush: Any = beam.DoFn.TimerParam(FLUSH_PARKED),
        timestamp: Timestamp = beam.DoFn.TimestampParam,
    ) -> Iterator[tuple[bytes, str]]:
        waiting = [(bundle, list(rows)) for bundle, rows in parked.read()]
        waiting = yield from self._append_in_order(self._streams[key], waiting, offset)
        self._park(waiting, parked, flush, timestamp)

    @staticmethod
    def _park(waiting: list[tuple[str, list[bytes]]], parked: Any, flush: Any, flush_at: Timestamp) -> None:
        parked.clear()
        for entry in waiting:
            parked.add(entry)
        if waiting:
            flush.set(flush_at)

    def _append_in_order(
        self, stream: str, batches: list[tuple[str, list[bytes]]], offset: Any
    ) -> Iterator[tuple[bytes, str]]:
        """Appends ``batches`` in order until one must wait; yields rejects; returns the batches still waiting."""
        for done, (_, rows) in enumerate(batches):
            position = StreamPosition(stream, offset.read() or 0)
            result = self._appender.append(position, rows)
            # What showed a runner reverting this state (docs/local-streaming.md); run with DEBUG to see it.
            _log.debug(
                "append %s rows at %s@%d in bundle %s: %s",
                len(rows),
                position.stream,
                position.offset,
                self._bundle,
                result.outcome.value,
            )
            self._retried.inc(result.retries)
            if result.outcome in (Outcome.WRITTEN, Outcome.ALREADY_WRITTEN):
                # A failure before this state write is committed replays this append, which then finds
                # ALREADY_EXISTS: the rows are not written twice.
                offset.write(position.offset + len(rows))
                counter = self._written if result.outcome is Outcome.WRITTEN else self._already
                counter.inc(len(rows))
                self._batches.update(len(rows))
                continue
            if result.outcome is Outcome.STREAM_GONE:
                raise StorageWriteError(f"write stream {stream} is gone; restart the pipeline to open new ones")
            yield from self._refuse(rows, result.rejected)
            valid = [row for index, row in enumerate(rows) if index not in result.rejected]
            later = [(self._bundle, later_rows) for _, later_rows in batches[done + 1 :]]
            return ([(self._bundle, valid)] if valid else []) + later
        return []


@dataclass(frozen=True)
class LocalWriteSettings:
    endpoint: str
    num_shards: int = 4
    batch_size: int = 500
    streaming: bool = False
    max_buffering_seconds: float = 0.0
    """Streaming: how long a stream's rows may wait for more (across bundles); 0 batches within each bundle."""


def create_streams(endpoint: str, spec: TableSpec, count: int) -> list[str]:
    """``count`` new COMMITTED streams on ``spec``'s table (the writer runs where the emulator is reachable)."""
    client = insecure_write_client(endpoint)
    try:
        appender = TableAppender(client, spec, proto_message_class(spec))
        return [appender.create_stream() for _ in range(count)]
    finally:
        client.transport.close()


class WriteTableLocally(beam.PTransform):
    """Writes row dicts to ``spec``'s table via the Storage Write API; returns (row JSON, reason) of rejects."""

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[tuple[str, str]]:
        spec, settings = self._spec, self._settings
        # Groups (batch) and state (streaming) are per key *and window*: rows in event-time windows (window
        # aggregates) would each start their own offset count on the same stream. One global window keeps one
        # offset sequence per stream, and lets batches span windows. Rows already there (enriched events) skip
        # the step, which costs a window object per row.
        if not rows.windowing.is_default():
            rows = rows | "Global window" >> beam.WindowInto(GlobalWindows())
        encoded = rows | "Encode rows" >> beam.ParDo(EncodeRowsFn(spec, settings.num_shards)).with_outputs(
            EncodeRowsFn.REJECTED, main="encoded"
        )
        append = _AppendStreaming(spec, settings) if settings.streaming else _AppendBatch(spec, settings)
        refused = (
            encoded.encoded | "Append per stream" >> append | "Refused rows as JSON" >> beam.ParDo(_RowJsonFn(spec))
        )
        unencodable = encoded[EncodeRowsFn.REJECTED] | "Unencodable rows as JSON" >> beam.MapTuple(
            lambda row, reason: (json.dumps(row, sort_keys=True, default=str), reason)
        )
        return (refused, unencodable) | "Rejected rows" >> beam.Flatten()


class _AppendBatch(beam.PTransform):
    """Bounded runs: one group per shard, appended in chunks (see ``AppendGroupFn``)."""

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings

    def expand(self, encoded: beam.PCollection[tuple[int, bytes]]) -> beam.PCollection[tuple[bytes, str]]:
        spec, settings = self._spec, self._settings
        *streams, probe = create_streams(settings.endpoint, spec, settings.num_shards + 1)
        return (
            encoded
            | "Group per stream" >> beam.GroupByKey()
            | "Append groups at offsets"
            >> beam.ParDo(AppendGroupFn(spec, settings.endpoint, streams, probe, settings.batch_size))
        )


class _AppendStreaming(beam.PTransform):
    """Unbounded runs: batches cut within bundles, appended at offsets kept in state (see ``AppendBatchesFn``)."""

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings

    def expand(self, encoded: beam.PCollection[tuple[int, bytes]]) -> beam.PCollection[tuple[bytes, str]]:
        spec, settings = self._spec, self._settings
        streams = create_streams(settings.endpoint, spec, settings.num_shards)
        if settings.max_buffering_seconds > 0:
            # Every append costs the emulator a fixed ~10 ms whatever its size, and bundles can be a handful of
            # rows: batching across bundles cut its CPU (docs/benchmarks.md). The batches are persisted
            # before the append, so a replay re-sends the same rows at the same offset.
            batches = encoded | "Batch per stream" >> BatchAcrossBundles(
                settings.batch_size, settings.max_buffering_seconds, value_type=bytes
            )
        else:
            batches = encoded | "Batch per stream within bundle" >> beam.ParDo(
                BatchWithinBundleFn(settings.batch_size)
            ).with_output_types(tuple[int, list[bytes]])
        return batches | "Append at offsets" >> beam.ParDo(AppendBatchesFn(spec, settings.endpoint, streams))


class _RowJsonFn(beam.DoFn):
    def __init__(self, spec: TableSpec) -> None:
        self._spec = spec
        self._message_class: type[message.Message] | None = None

    def setup(self) -> None:
        self._message_class = proto_message_class(self._spec)

    def process(self, element: tuple[bytes, str]) -> Iterator[tuple[str, str]]:
        encoded, reason = element
        yield row_json(self._message_class, self._spec, encoded), reason
