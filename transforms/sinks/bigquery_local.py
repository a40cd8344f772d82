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

import itertools
import json
import logging
import uuid
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import apache_beam as beam
from apache_beam.coders import BytesCoder, IterableCoder, StrUtf8Coder, TupleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient
from google.protobuf import message

from transforms.batching import BatchAcrossBundles, BatchWithinBundleFn
from transforms.lists import lists_per_key, per_item
from transforms.sinks.bigquery_append import (
    Outcome,
    StorageWriteError,
    StreamPosition,
    TableAppender,
    insecure_write_client,
)
from transforms.sinks.bigquery_proto import (
    RowEncoder,
    chunked,
    proto_message_class,
    refusal_sentinel,
    row_json,
    stream_of_row,
)
from transforms.sinks.bigquery_tables import TableSpec
from transforms.state_cache import prepare_worker_state

_log = logging.getLogger(__name__)

T = TypeVar("T")

METRICS_NAMESPACE = "sink.bigquery"

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
        prepare_worker_state()
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
        self,
        spec: TableSpec,
        endpoint: str,
        streams: Sequence[str],
        probe_stream: str,
        batch_size: int,
        row_lists: bool = False,
    ) -> None:
        """``row_lists``: a group's values are lists of rows, appended in the group's order."""
        super().__init__(spec, endpoint)
        refusal_sentinel(spec)  # fails at build time for a table that could not be probed
        self._streams = tuple(streams)
        self._probe_stream = probe_stream
        self._batch_size = batch_size
        self._row_lists = row_lists

    def process(self, element: tuple[int, Iterable[bytes] | Iterable[list[bytes]]]) -> Iterator[tuple[bytes, str]]:
        shard, rows = element
        if self._row_lists:
            rows = itertools.chain.from_iterable(rows)
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
    STREAM = ReadModifyWriteStateSpec("stream", StrUtf8Coder())
    """The shard's stream when it is no longer the one created at build time (see ``_reopen``)."""
    PARKED = BagStateSpec("parked", _PARKED_CODER)
    # Event time: outputs of a processing-time timer in a bounded run would be late and dropped.
    FLUSH_PARKED = TimerSpec("flush_parked", TimeDomain.WATERMARK)

    def __init__(self, spec: TableSpec, endpoint: str, streams: Sequence[str]) -> None:
        super().__init__(spec, endpoint)
        # One COMMITTED stream per shard, created when the pipeline was built: a stream created inside a
        # bundle would be lost with it, and the retry would write the same rows into a second stream.
        self._streams = tuple(streams)
        self._bundle = ""
        self._reopened = Metrics.counter(METRICS_NAMESPACE, f"{spec.table}.streams_reopened")

    def start_bundle(self) -> None:
        # Tells batches parked by this bundle (not committed yet) from those parked by committed ones.
        self._bundle = uuid.uuid4().hex

    def process(
        self,
        element: tuple[int, Iterable[bytes]],
        offset: Any = beam.DoFn.StateParam(OFFSET),
        stream: Any = beam.DoFn.StateParam(STREAM),
        parked: Any = beam.DoFn.StateParam(PARKED),
        flush: Any = beam.DoFn.TimerParam(FLUSH_PARKED),
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        window: Any = beam.DoFn.WindowParam,
    ) -> Iterator[tuple[bytes, str]]:
        shard, batch = element
        waiting = list(parked.read())
        if any(bundle == self._bundle for bundle, _ in waiting):
            waiting.append((self._bundle, list(batch)))
        else:
            batches = [*waiting, (self._bundle, list(batch))]
            waiting = yield from self._append_in_order(shard, batches, offset, stream)
        # Timer outputs carry the timer's timestamp, which must lie inside the window.
        self._park(waiting, parked, flush, min(timestamp, window.max_timestamp()))

    @on_timer(FLUSH_PARKED)
    def flush_parked(
        self,
        key: int = beam.DoFn.KeyParam,
        offset: Any = beam.DoFn.StateParam(OFFSET),
        stream: Any = beam.DoFn.StateParam(STREAM),
        parked: Any = beam.DoFn.StateParam(PARKED),
        flush: Any = beam.DoFn.TimerParam(FLUSH_PARKED),
        timestamp: Timestamp = beam.DoFn.TimestampParam,
    ) -> Iterator[tuple[bytes, str]]:
        waiting = [(bundle, list(rows)) for bundle, rows in parked.read()]
        waiting = yield from self._append_in_order(key, waiting, offset, stream)
        self._park(waiting, parked, flush, timestamp)

    def _reopen(self, shard: int, lost: str, offset: Any, stream: Any) -> StreamPosition:
        """A new COMMITTED stream for ``shard``, from offset 0, kept in state in place of ``lost``.

        Only the emulator loses streams (it keeps them in memory, so a restart forgets them); BigQuery keeps a
        COMMITTED stream until it is finalized. Exactly once still holds: every row the lost stream took was
        acknowledged (the appends acknowledged went into ``offset``), and an append it did not acknowledge was
        not written, because the emulator drains its calls when it stops (devstack/bigquery_emulator_serve.py).
        If this bundle fails after the new stream took rows, its retry opens another and writes them again:
        a raw duplicate, which ``enriched_events_unique`` and ``window_aggregates_current`` absorb. On Prism a
        failed bundle fails the job, whose resume skips what the table holds."""
        new = self._appender.create_stream()
        _log.warning("write stream %s of %s is gone; shard %d continues in %s", lost, self._spec.table, shard, new)
        self._reopened.inc()
        stream.write(new)
        offset.write(0)
        return StreamPosition(new, 0)

    @staticmethod
    def _park(waiting: list[tuple[str, list[bytes]]], parked: Any, flush: Any, flush_at: Timestamp) -> None:
        parked.clear()
        for entry in waiting:
            parked.add(entry)
        if waiting:
            flush.set(flush_at)

    def _append_in_order(
        self, shard: int, batches: list[tuple[str, list[bytes]]], offset: Any, stream: Any
    ) -> Iterator[tuple[bytes, str]]:
        """Appends ``batches`` in order until one must wait; yields rejects; returns the batches still waiting."""
        for done, (_, rows) in enumerate(batches):
            position = StreamPosition(stream.read() or self._streams[shard], offset.read() or 0)
            result = self._appender.append(position, rows)
            if result.outcome is Outcome.STREAM_GONE:
                position = self._reopen(shard, position.stream, offset, stream)
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
                raise StorageWriteError(f"the new write stream {position.stream} is gone as soon as it was opened")
            yield from self._refuse(rows, result.rejected)
            valid = [row for index, row in enumerate(rows) if index not in result.rejected]
            later = [(self._bundle, later_rows) for _, later_rows in batches[done + 1 :]]
            return ([(self._bundle, valid)] if valid else []) + later
        return []


@dataclass(frozen=True)
class LocalWriteSettings:
    endpoint: str
    num_shards: int = 4
    batch_size: int = 5000
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

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings, row_lists: bool = False) -> None:
        """``row_lists``: the input holds lists of rows (``transforms/lists.py``)."""
        super().__init__()
        self._spec = spec
        self._settings = settings
        self._row_lists = row_lists

    def expand(self, rows: beam.PCollection[dict[str, Any]]) -> beam.PCollection[tuple[str, str]]:
        spec, settings, lists = self._spec, self._settings, self._row_lists
        # Groups (batch) and state (streaming) are per key *and window*: rows in event-time windows (window
        # aggregates) would each start their own offset count on the same stream. One global window keeps one
        # offset sequence per stream, and lets batches span windows. Rows already there (enriched events) skip
        # the step, which costs a window object per row.
        if not rows.windowing.is_default():
            rows = rows | "Global window" >> beam.WindowInto(GlobalWindows())
        encode = per_item(EncodeRowsFn(spec, settings.num_shards), lists)
        encoded = rows | "Encode rows" >> beam.ParDo(encode).with_outputs(EncodeRowsFn.REJECTED, main="encoded")
        to_append = encoded.encoded
        if lists:
            # Each list crosses into a shard's group as one element per shard it holds rows of.
            to_append = to_append | "Lists per stream" >> beam.FlatMap(lists_per_key)
        append = _AppendStreaming(spec, settings, lists) if settings.streaming else _AppendBatch(spec, settings, lists)
        refused = to_append | "Append per stream" >> append | "Refused rows as JSON" >> beam.ParDo(_RowJsonFn(spec))
        unencodable = encoded[EncodeRowsFn.REJECTED] | "Unencodable rows as JSON" >> beam.MapTuple(
            lambda row, reason: (json.dumps(row, sort_keys=True, default=str), reason)
        )
        return (refused, unencodable) | "Rejected rows" >> beam.Flatten()


class _AppendBatch(beam.PTransform):
    """Bounded runs: one group per shard, appended in chunks (see ``AppendGroupFn``); its values are rows, or
    with ``row_lists`` lists of rows."""

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings, row_lists: bool = False) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings
        self._row_lists = row_lists

    def expand(self, encoded: beam.PCollection[tuple[int, bytes]]) -> beam.PCollection[tuple[bytes, str]]:
        spec, settings = self._spec, self._settings
        *streams, probe = create_streams(settings.endpoint, spec, settings.num_shards + 1)
        return (
            encoded
            | "Group per stream" >> beam.GroupByKey()
            | "Append groups at offsets"
            >> beam.ParDo(
                AppendGroupFn(spec, settings.endpoint, streams, probe, settings.batch_size, row_lists=self._row_lists)
            )
        )


class _AppendStreaming(beam.PTransform):
    """Unbounded runs: batches cut within bundles, appended at offsets kept in state (see ``AppendBatchesFn``);
    its values are rows, or with ``row_lists`` lists of rows."""

    def __init__(self, spec: TableSpec, settings: LocalWriteSettings, row_lists: bool = False) -> None:
        super().__init__()
        self._spec = spec
        self._settings = settings
        self._row_lists = row_lists

    def expand(self, encoded: beam.PCollection[tuple[int, bytes]]) -> beam.PCollection[tuple[bytes, str]]:
        spec, settings = self._spec, self._settings
        streams = create_streams(settings.endpoint, spec, settings.num_shards)
        if settings.max_buffering_seconds > 0:
            # Every append costs the emulator a fixed amount whatever its size, and bundles can be a handful of
            # rows: batching across bundles cut its CPU (docs/benchmarks.md). The batches are persisted
            # before the append, so a replay re-sends the same rows at the same offset.
            batches = encoded | "Batch per stream" >> BatchAcrossBundles(
                settings.batch_size, settings.max_buffering_seconds, value_type=bytes, value_lists=self._row_lists
            )
        else:
            batches = encoded | "Batch per stream within bundle" >> beam.ParDo(
                BatchWithinBundleFn(settings.batch_size, self._row_lists)
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
