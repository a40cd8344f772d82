"""The HTTP sink's write-ahead intent log: every batch is recorded in BigQuery before it is posted.

The API is idempotent per batch (``Idempotency-Key``), but a restarted job re-reads an overlap of Kafka and
would form *different* batches, whose keys the API has never seen. So ``PostBatchesFn`` records each batch
(its key, its ids and its exact body) in the ``http_intents`` table and waits for BigQuery's acknowledgement
before the first POST. A resumed job (transforms/resume.py) then:

- re-sends every batch recorded since its resume point, as it was: same ids, same key, same body, which the API
  answers as a replay if it had it, and stores if the stop came before the POST reached it;
- skips the re-read events of those batches, and batches only events that no intent names, which were never
  posted.

So the HTTP API gets each event once whatever happened between the intent and the POST's answer: a killed
job, a Redis without persistence (the ledger this replaces lived there), a lost acknowledgement. Rows of a
retried bundle repeat an intent; readers keep one row per key. The table's partitions expire after two days;
a resume reads only its overlap (minutes).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput

from transforms.bigquery_reads import BigQueryReadSettings, Query, RunQueryFn, bigquery_client, run_query
from transforms.dead_letters import DEAD_LETTER_TAG
from transforms.model import DeadLetter, SourceCoordinates, Stage
from transforms.sinks.bigquery_tables import TableSpec
from transforms.sinks.http_wire import Batch, shard_of_event

INTENTS_TABLE = "http_intents"
METRICS_NAMESPACE = "sink.http"

_log = logging.getLogger(__name__)


# --- pure rules ---------------------------------------------------------------------------------------------


def joined_ids(batch: Batch) -> str:
    """The batch's ids as the key hashes them: ascending, comma-separated."""
    return ",".join(str(event_id) for event_id in batch.event_ids)


def intent_row(batch: Batch, recorded_at: datetime) -> dict:
    return {
        "idempotency_key": batch.key,
        "event_ids": joined_ids(batch),
        "body": batch.body().decode("utf-8"),
        "event_count": len(batch.events),
        "recorded_at": recorded_at,
    }


class UnreplayableIntentError(ValueError):
    """An intent whose body does not re-form the batch it was recorded for (a defect, never expected)."""


def batch_of_intent(key: str, event_ids: str, body: str) -> Batch:
    """The batch an intent recorded, rebuilt from its body with the same key and byte-identical body.

    Event documents hold only strings, integers, booleans and nulls, so parsing one and writing it back the way
    ``encode_event`` does gives its original bytes; the check below proves it for every replay.
    """
    try:
        documents = json.loads(body)["events"]
        batch = Batch.of(
            (
                document["id"],
                json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"),
            )
            for document in documents
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UnreplayableIntentError(f"intent {key}: its body is not a batch: {error}") from error
    if batch.key != key or joined_ids(batch) != event_ids or batch.body() != body.encode("utf-8"):
        raise UnreplayableIntentError(f"intent {key}: its body does not re-form the batch it was recorded for")
    return batch


# --- writing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntentLogSettings:
    spec: TableSpec
    """The ``http_intents`` table (columns from sql/bigquery/001_tables.sql)."""
    endpoint: str | None = None
    """The emulator's Storage Write API, ``host:port`` over plaintext gRPC; None: Google's BigQuery."""


class IntentWriter:
    """Appends intents to the table's ``_default`` stream; one per ``PostBatchesFn`` instance, opened in its
    ``setup()`` and closed in its ``teardown()``."""

    def __init__(self, settings: IntentLogSettings) -> None:
        from google.cloud.bigquery_storage_v1 import BigQueryWriteClient

        from transforms.sinks.bigquery_append import TableAppender, insecure_write_client
        from transforms.sinks.bigquery_proto import RowEncoder, proto_message_class

        self._client = insecure_write_client(settings.endpoint) if settings.endpoint else BigQueryWriteClient()
        message_class = proto_message_class(settings.spec)
        self._encode = RowEncoder(message_class, settings.spec)
        self._appender = TableAppender(self._client, settings.spec, message_class)
        self._stream = self._appender.default_stream()
        self._table = settings.spec.table_id

    def record(self, batches: Sequence[Batch]) -> None:
        """Returns once BigQuery holds every intent; raises ``StorageWriteError`` if it cannot (after retries).

        One append per 10 MB of intents: the emulator's CPU per append, not per row, is what they cost it."""
        from transforms.sinks.bigquery_append import Outcome, StorageWriteError, StreamPosition
        from transforms.sinks.bigquery_proto import chunked

        now = datetime.now(UTC)
        rows = [self._encode(intent_row(batch, now)) for batch in batches]
        for chunk in chunked(rows, size=len(rows) or 1):
            result = self._appender.append(StreamPosition(self._stream, None), chunk)
            if result.outcome is not Outcome.WRITTEN:
                raise StorageWriteError(
                    f"could not record {len(chunk)} batches in {self._table}: {result.outcome.value}"
                )

    def close(self) -> None:
        self._client.transport.close()


# --- reading at a resume ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntentsSince:
    """The intents recorded from ``since`` on: ``ids()`` is an ``IdLoader`` (transforms/resume.py) of the events
    they name, ``query()`` what ``ReplayIntents`` re-sends."""

    settings: BigQueryReadSettings
    table: str
    since: datetime

    def query(self) -> Query:
        return Query(
            f"SELECT idempotency_key, event_ids, body FROM `{self.settings.table_id(self.table)}`"  # noqa: S608
            " WHERE recorded_at >= @since",
            (("since", self.since),),
        )

    def ids(self) -> frozenset[int]:
        query = Query(
            f"SELECT DISTINCT event_ids FROM `{self.settings.table_id(self.table)}`"  # noqa: S608
            " WHERE recorded_at >= @since",
            (("since", self.since),),
        )
        client = bigquery_client(self.settings)
        try:
            return frozenset(int(i) for row in run_query(client, query) for i in row["event_ids"].split(","))
        finally:
            client.close()


class _OncePerKeyFn(beam.DoFn):
    """Drops repeated intents (a retried bundle records its batches again). Fused with the one query's read,
    so one bundle sees every row; a repeat that slipped through would be sent again with its own key, which the
    API answers as a replay."""

    def start_bundle(self) -> None:
        self._seen: set[str] = set()

    def process(self, row: dict) -> Iterator[dict]:
        if row["idempotency_key"] not in self._seen:
            self._seen.add(row["idempotency_key"])
            yield row


class _IntentBatchesFn(beam.DoFn):
    """Intent rows -> (shard, events) as ``PostBatchesFn`` takes them."""

    def __init__(self, shards: int) -> None:
        self._shards = shards
        self._replayed = Metrics.counter(METRICS_NAMESPACE, "intents_resent")
        self._unreplayable = Metrics.counter(METRICS_NAMESPACE, "intents_unreplayable")

    def start_bundle(self) -> None:
        self._batches = self._events = 0

    def finish_bundle(self) -> None:
        if self._batches:
            _log.info(
                "resume: sending %d recorded batches (%d events) again, as they were", self._batches, self._events
            )

    def process(self, row: dict) -> Iterator[tuple[int, tuple[tuple[int, bytes], ...]] | TaggedOutput]:
        key = row["idempotency_key"]
        try:
            batch = batch_of_intent(key, row["event_ids"], row["body"])
        except UnreplayableIntentError as error:
            self._unreplayable.inc()
            first_id = int(row["event_ids"].split(",")[0])
            source = SourceCoordinates(kind="postgres", table="engagement_events", row_id=first_id)
            dead = DeadLetter.of(Stage.HTTP, str(error), row["body"].encode("utf-8"), source)
            yield TaggedOutput(DEAD_LETTER_TAG, dead)
            return
        self._replayed.inc()
        self._batches += 1
        self._events += len(batch.events)
        yield shard_of_event(batch.event_ids[0], self._shards), batch.events


class ReplayIntents(beam.PTransform):
    """The batches recorded since a resume point, to be posted again as they were (module docstring)."""

    def __init__(self, intents: IntentsSince, shards: int) -> None:
        super().__init__()
        self._intents = intents
        self._shards = shards

    def expand(self, pipeline: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        query = self._intents.query()
        return (
            pipeline
            | "Start" >> beam.Impulse()
            | "Intents query" >> beam.Map(lambda _: query)
            | "Read intents" >> beam.ParDo(RunQueryFn(self._intents.settings, METRICS_NAMESPACE, page_size=1_000))
            | "Once per key" >> beam.ParDo(_OncePerKeyFn())
            # One query, one bundle: a reshuffle spreads the re-sends over the sending shards.
            | "Spread" >> beam.Reshuffle()
            | "Re-form batches"
            >> beam.ParDo(_IntentBatchesFn(self._shards)).with_outputs(DEAD_LETTER_TAG, main="batches")
        )
