"""The external HTTP API sink (SPEC §6): enriched events as JSON batches with an idempotency key.

    enriched events
      | GlobalWindow        batching is a processing-time concern; event-time windows would split batches
      | EncodeAndShard      (shard, (event id, event JSON bytes)); shard = crc32(id) % shards
      | Batch per shard     at most batch_size events, flushed after max_wait_seconds at the latest
                            (transforms/batching.py: per-bundle lists, then GroupIntoBatches across bundles)
      | PersistBatches      ReshufflePerKey: a checkpoint, so a retried POST bundle sees the same batches
                            (skipped with checkpoint_batches=False, for Python's DirectRunner)
      | PostBatches         record the batch in the intent log (BigQuery), then POST {"events": [...]} with
                            Idempotency-Key = hash of the batch's sorted ids; streaming, once
      | RetryDeferred       streaming: batches refused for now, kept in their shard's state and retried in
                            rounds from a timer (http_deferred), so no bundle waits out an outage
      -> dead letters, one per event that could not be delivered

    a resumed job's recorded batches (ReplayIntents) join before PersistBatches and are posted as they were.

The body and the key depend only on the batch's events, never on time or attempt, so every retry of a batch
(by this DoFn, or by the runner re-running the bundle) carries the same key and the same body, and the API
stores it once. docs/http-sink.md explains what is and is not guaranteed, and how an outage stays in this
branch instead of stalling the rest of the pipeline.

By role: the wire format (events, batches, keys) is ``http_wire``, the delivery rules (retries, Retry-After,
give-up) ``http_delivery``, one POST and the metrics ``http_client``, the later retries ``http_deferred``, the
token ``http_token``, the write-ahead intent log ``http_intents``; this module holds the settings and options,
the first-try DoFn and the transform.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.util import ReshufflePerKey
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.batching import BatchAcrossBundles
from transforms.dead_letters import DEAD_LETTER_TAG, GuardedMap
from transforms.lists import lists_per_key
from transforms.model import DeadLetter, EnrichedEvent, Stage
from transforms.secrets import runs_on_dataflow
from transforms.settings import add_options, option_values, parse_bool, setting
from transforms.sinks.http_client import ApiClient, SinkCounters, wall_clock
from transforms.sinks.http_deferred import DeferredBatch, RetryDeferredBatchesFn
from transforms.sinks.http_delivery import Delivery, RetryPolicy, deliver, delivery_of
from transforms.sinks.http_intents import (
    INTENTS_TABLE,
    IntentLogSettings,
    IntentsSince,
    IntentWriter,
    ReplayIntents,
)
from transforms.sinks.http_token import SECRET_VERSION_PATTERN, TokenSource
from transforms.sinks.http_wire import Batch, display_url, encode_event, shard_of_event

_log = logging.getLogger(__name__)


INTENTS_PER_APPEND = 16
INTENT_BYTES_PER_APPEND = 4 * 1024 * 1024
"""Batches recorded per intent append, at most: the append waits for all of them (AppendRows takes 10 MB)."""


# --- settings and options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpSinkSettings:
    endpoint: str
    token_source: TokenSource
    """Where each worker reads the bearer token in setup(); the token itself never enters the graph."""
    batch_size: int = setting(
        500,
        flag="--http_api_batch_size",
        type=int,
        help="Largest number of events in one POST.",
    )
    max_wait_seconds: float = setting(
        1.0,
        flag="--http_api_max_wait_seconds",
        type=float,
        help="Longest time an incomplete batch waits for more events before it is sent, in seconds.",
    )
    shards: int = setting(
        8,
        flag="--http_api_shards",
        type=int,
        help=(
            "Number of batching keys: events are spread over them by event id. Bounds how many batches "
            "are formed and retried in parallel (and so how many worker threads an outage can hold)."
        ),
    )
    max_in_flight: int = setting(
        4,
        flag="--http_api_max_in_flight",
        type=int,
        help="Most concurrent POSTs (and pooled connections) per DoFn instance.",
    )
    connect_timeout_seconds: float = setting(
        5.0,
        flag="--http_api_connect_timeout_seconds",
        type=float,
        help="Timeout for opening a connection to the API, in seconds.",
    )
    read_timeout_seconds: float = setting(
        30.0,
        flag="--http_api_read_timeout_seconds",
        type=float,
        help="Timeout for the API's response once the request is sent, in seconds.",
    )
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # False only for Python's DirectRunner (see docs/http-sink.md): it completes a GroupByKey before
    # GroupIntoBatches' end-of-window flush, and fails the pipeline when that flush arrives.
    checkpoint_batches: bool = setting(
        True,
        flag="--http_api_checkpoint_batches",
        option_default="true",
        parse=parse_bool,
        choices=["true", "false"],
        help=(
            "Persist batches between forming and sending them, so a retried send reuses them exactly. "
            "'false' only on Python's DirectRunner, which cannot run that checkpoint (docs/http-sink.md)."
        ),
    )
    bounded_input: bool = False
    """A bounded run (the backfill) cuts batches by count only: the end of its input flushes what is left, and
    no processing-time timer is set, which the FnApiRunner cannot fire. For the same reason it retries each
    batch in ``PostBatches`` and has no ``RetryDeferred`` step."""
    intents: IntentLogSettings | None = None
    """Where each batch is recorded before its first POST (transforms/sinks/http_intents.py); None: nowhere,
    and a resumed job sends its overlap again in new batches."""
    replay: IntentsSince | None = None
    """A resumed job's batches to send again as they were, set by its plan (pipelines/streaming.py)."""

    def __post_init__(self) -> None:
        parts = urlsplit(self.endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the HTTP API endpoint must be an http(s) URL, got {display_url(self.endpoint)!r}")
        if min(self.batch_size, self.shards, self.max_in_flight) < 1:
            raise ValueError("batch_size, shards and max_in_flight must be at least 1")
        # Zero would mean "no time limit" to GroupIntoBatches: a quiet shard would hold its events forever.
        if self.max_wait_seconds <= 0:
            raise ValueError("max_wait_seconds must be positive")
        if self.connect_timeout_seconds <= 0 or self.read_timeout_seconds <= 0:
            raise ValueError("timeouts must be positive")
        if self.replay is not None and self.intents is None:
            raise ValueError("re-sending recorded batches needs the intent log")

    @classmethod
    def from_options(cls, options: PipelineOptions) -> HttpSinkSettings | None:
        """The settings, or None when the sink is disabled."""
        opts = options.view_as(HttpSinkOptions)
        if opts.http_api_sink == "disabled":
            return None
        if not opts.http_api_url:
            raise ValueError("--http_api_url is required unless --http_api_sink=disabled")
        token_source = token_source_from(opts, on_dataflow=runs_on_dataflow(options))
        return cls(
            endpoint=opts.http_api_url,
            token_source=token_source,
            retry=RetryPolicy(**option_values(RetryPolicy, opts)),
            intents=intent_log_from(options, opts.http_api_intents_table),
            **option_values(cls, opts),
        )


def intent_log_from(options: PipelineOptions, table: str) -> IntentLogSettings | None:
    """The intent log in the BigQuery sink's dataset, written as the sink writes (the emulator locally)."""
    from transforms.sinks.bigquery import LOCAL_STORAGE_WRITE, BigQuerySinkSettings

    if not table:
        return None
    bigquery = BigQuerySinkSettings.from_options(options)
    endpoint = bigquery.endpoint if bigquery.write_method == LOCAL_STORAGE_WRITE else None
    return IntentLogSettings(spec=bigquery.table_spec(INTENTS_TABLE, table), endpoint=endpoint)


def token_source_from(opts: HttpSinkOptions, on_dataflow: bool) -> TokenSource:
    """The token's source from the options, checked where the pipeline is built.

    A secret outranks the variable (whose name has a default); a file and a secret together are ambiguous. An
    environment variable or a file is read once here, so a missing token fails the launch, not every worker.
    A secret is checked by the template launcher (templates/launch.py), which has Secret Manager access; graph
    tests build offline."""
    if opts.http_api_token_secret and opts.http_api_token_file:
        raise ValueError("give --http_api_token_secret or --http_api_token_file, not both")
    if opts.http_api_token_secret:
        if not re.fullmatch(SECRET_VERSION_PATTERN, opts.http_api_token_secret):
            raise ValueError(
                f"--http_api_token_secret {opts.http_api_token_secret!r} is not "
                "projects/PROJECT/secrets/NAME/versions/VERSION"
            )
        return TokenSource(secret_version=opts.http_api_token_secret)
    if on_dataflow and not opts.http_api_token_file:
        raise ValueError(
            "on Dataflow the workers read the HTTP API token themselves and do not have the launcher's "
            "environment: give --http_api_token_secret (a Secret Manager version), or --http_api_sink=disabled"
        )
    source = (
        TokenSource(file_path=opts.http_api_token_file)
        if opts.http_api_token_file
        else TokenSource(env_var=opts.http_api_token_env)
    )
    source.read()
    return source


class HttpSinkOptions(PipelineOptions):
    """Options of the external HTTP API sink (docs/http-sink.md)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--http_api_sink",
            default="enabled",
            choices=["enabled", "disabled"],
            help="Whether to send enriched events to the external HTTP API ('disabled' skips the sink).",
        )
        parser.add_argument(
            "--http_api_url",
            default=None,
            help="Full URL the event batches are POSTed to, e.g. https://api.example.com/v1/events.",
        )
        parser.add_argument(
            "--http_api_token_env",
            default="HTTP_API_TOKEN",
            help=(
                "Name of the environment variable holding the bearer token, read where the pipeline is "
                "launched. The token itself is never an option, so it never shows in job parameters."
            ),
        )
        parser.add_argument(
            "--http_api_token_file",
            default=None,
            help=(
                "Path of a file holding the bearer token, read by each worker; when given, used instead of "
                "--http_api_token_env. On Dataflow the file must exist on the workers (in the image)."
            ),
        )
        parser.add_argument(
            "--http_api_token_secret",
            default=None,
            help=(
                "Secret Manager secret version holding the bearer token "
                "(projects/PROJECT/secrets/NAME/versions/VERSION), read by each worker with its service "
                "account, so the token is in neither the job's parameters nor its staged graph. Required on "
                "Dataflow unless the sink is disabled; used instead of --http_api_token_env."
            ),
        )
        add_options(parser, HttpSinkSettings, RetryPolicy)
        parser.add_argument(
            "--http_api_intents_table",
            default=INTENTS_TABLE,
            help=(
                "BigQuery table (in --bigquery_dataset) where each batch is recorded before it is posted, so a job "
                "restarted with --start_offset=resume sends the batches of its overlap again with their own "
                "idempotency keys and never sends an event in a second batch. Empty: no log, and a resumed job "
                "sends its overlap again in new batches (the API then stores those events twice)."
            ),
        )


# --- the transform --------------------------------------------------------------------------------------


DEFERRED_TAG = "deferred"
"""PostBatchesFn's output of batches to retry later: (shard, DeferredBatch)."""


class PostBatchesFn(beam.DoFn):
    """POSTs batches, several at once; the undeliverable become dead letters.

    Streaming, each batch is tried once here: one the API refuses for now leaves on ``DEFERRED_TAG`` for
    ``RetryDeferredBatchesFn`` (transforms/sinks/http_deferred.py), so no bundle waits out an outage. Bounded
    (the backfill), there is no later: each batch is retried here until it is delivered or gives up.
    """

    def __init__(self, settings: HttpSinkSettings) -> None:
        self._settings = settings

    def setup(self) -> None:
        settings = self._settings
        # The token is read here, on the worker (ApiClient): captured at construction it would be pickled
        # into the job graph.
        self._client = ApiClient(settings)
        self._pool = ThreadPoolExecutor(max_workers=settings.max_in_flight, thread_name_prefix="http-sink")
        self._stopping = threading.Event()
        self._intents = IntentWriter(settings.intents) if settings.intents is not None else None
        self._counters = SinkCounters()
        self._defer = not settings.bounded_input

    def start_bundle(self) -> None:
        self._pending: deque[tuple[int, Batch, Timestamp, float, Future[Delivery]]] = deque()
        self._unrecorded: list[tuple[int, Batch, Timestamp]] = []
        self._unrecorded_bytes = 0

    def process(
        self, keyed_batch: tuple[int, Iterable[tuple[int, bytes]]], timestamp: Timestamp = beam.DoFn.TimestampParam
    ) -> Iterator[DeadLetter | TaggedOutput]:
        shard, events = keyed_batch
        batch = Batch.of(events)
        if not batch.events:
            return
        # Intents are recorded several batches to an append: the emulator spends a fixed share of CPU on any
        # append, which one append per batch made the local stack's largest cost (docs/benchmarks.md).
        self._unrecorded.append((shard, batch, timestamp))
        self._unrecorded_bytes += sum(len(payload) for _, payload in batch.events)
        if len(self._unrecorded) >= INTENTS_PER_APPEND or self._unrecorded_bytes >= INTENT_BYTES_PER_APPEND:
            for output, _ in self._record_and_send():
                yield output

    def _record_and_send(self) -> Iterator[tuple[DeadLetter | TaggedOutput, Timestamp]]:
        """Records the batches not yet recorded, then starts them; yields the outputs of batches that complete
        meanwhile, with their batch's timestamp."""
        unrecorded, self._unrecorded, self._unrecorded_bytes = self._unrecorded, [], 0
        if self._intents is not None and unrecorded:
            # Write-ahead: BigQuery holds the batches before the API can. If they cannot be recorded, the
            # bundle fails and the runner retries it; nothing is posted without its intent.
            self._intents.record([batch for _, batch, _ in unrecorded])
        for shard, batch, timestamp in unrecorded:
            # Bounded concurrency: before starting another batch, wait for the oldest one in flight.
            while len(self._pending) >= self._settings.max_in_flight:
                yield from self._complete(*self._pending.popleft())
            started = time.monotonic()
            self._pending.append((shard, batch, timestamp, started, self._pool.submit(self._deliver, batch)))

    def finish_bundle(self) -> list[WindowedValue | TaggedOutput]:
        # The bundle only ends once every batch is delivered, deferred or dead-lettered, so a runner that
        # commits it never loses a batch that was still in flight. A list, not a generator: the work (and its
        # metrics) must happen while the runner is in finish_bundle, not whenever it iterates the outputs.
        completed = list(self._record_and_send())
        while self._pending:
            completed.extend(self._complete(*self._pending.popleft()))
        outputs: list[WindowedValue | TaggedOutput] = []
        for output, timestamp in completed:
            if isinstance(output, TaggedOutput):
                outputs.append(TaggedOutput(output.tag, WindowedValue(output.value, timestamp, (GlobalWindow(),))))
            else:
                outputs.append(WindowedValue(output, timestamp, (GlobalWindow(),)))
        return outputs

    def teardown(self) -> None:
        if hasattr(self, "_pool"):
            self._stopping.set()  # wakes batches sleeping between retries; they fail, and so does the bundle
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._client.close()
            if self._intents is not None:
                self._intents.close()

    def _complete(
        self, shard: int, batch: Batch, timestamp: Timestamp, started: float, future: Future[Delivery]
    ) -> Iterator[tuple[DeadLetter | TaggedOutput, Timestamp]]:
        delivery = future.result()  # an unexpected exception fails the bundle, and the runner retries it
        self._counters.retried.inc(delivery.retries)
        if delivery.delivered:
            self._counters.delivered(batch, delivery.replayed, time.monotonic() - started)
            return
        if delivery.deferred is not None:
            self._counters.deferred.inc()
            first_attempt_at = wall_clock() - (time.monotonic() - started)
            deferred = DeferredBatch(batch, first_attempt_at, delivery.attempts, delivery.deferred)
            yield TaggedOutput(DEFERRED_TAG, (shard, deferred)), timestamp
            return
        _log.warning(
            "HTTP API sink: %d events of batch %s dead-lettered: %s", len(batch.events), batch.key, delivery.reason
        )
        reason = f"HTTP API {self._client.endpoint_shown} {delivery.reason} (Idempotency-Key {batch.key})"
        for dead_letter in self._counters.dead_letters(batch, reason):
            yield dead_letter, timestamp

    def _deliver(self, batch: Batch) -> Delivery:
        if self._defer:
            return delivery_of(self._client.send(batch), attempts=1)
        return deliver(lambda: self._client.send(batch), self._settings.retry, self._sleep)

    def _sleep(self, seconds: float) -> bool:
        return not self._stopping.wait(seconds)


def _encode_and_shard(enriched: EnrichedEvent, shards: int) -> tuple[int, tuple[int, bytes]]:
    event_id = enriched.event.id
    return shard_of_event(event_id, shards), (event_id, encode_event(enriched))


class WriteToHttpApi(beam.PTransform):
    """EnrichedEvent -> the external HTTP API, in idempotent batches; returns the undelivered as dead letters."""

    def __init__(self, settings: HttpSinkSettings, event_lists: bool = False) -> None:
        """``event_lists``: the input holds lists of events (``transforms/lists.py``)."""
        super().__init__()
        self._settings = settings
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> beam.PCollection[DeadLetter]:
        settings, lists = self._settings, self._event_lists
        encoded = (
            events
            # Batches are cut by count and processing time; an event-time window would only split them.
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            # Encoded before batching: the state and the checkpoint hold exactly the bytes that are sent. An
            # event that cannot be encoded (e.g. text no UTF-8 can carry) is a dead letter, not a failed batch.
            | "EncodeAndShard"
            >> GuardedMap(
                Stage.HTTP,
                "http.encode",
                _encode_and_shard,
                settings.shards,
                output_type=list[tuple[int, tuple[int, bytes]]] if lists else tuple[int, tuple[int, bytes]],
                lists=lists,
            )
        )
        to_batch = encoded.converted
        if lists:
            # Each list crosses into a shard's batches as one element per shard it holds events of.
            to_batch = to_batch | "Lists per shard" >> beam.FlatMap(lists_per_key).with_output_types(
                tuple[int, list[tuple[int, bytes]]]
            )
        max_wait = None if settings.bounded_input else settings.max_wait_seconds
        batches = to_batch | "Batch per shard" >> BatchAcrossBundles(
            settings.batch_size, max_wait, value_type=tuple[int, bytes], value_lists=lists
        )
        replayed_dead: list[beam.PCollection[DeadLetter]] = []
        if settings.replay is not None:
            replays = events.pipeline | "Recorded batches again" >> ReplayIntents(settings.replay, settings.shards)
            batches = (batches, replays.batches) | "With recorded batches" >> beam.Flatten()
            replayed_dead.append(replays[DEAD_LETTER_TAG])
        if settings.checkpoint_batches:
            # A checkpoint between forming and sending batches: a retried PostBatches bundle reads the
            # batches the runner persisted instead of regrouping. Still keyed by shard, so a streaming runner
            # runs at most `shards` sending bundles at a time, however long an outage lasts.
            batches = batches | "PersistBatches" >> ReshufflePerKey()
        posted = batches | "PostBatches" >> beam.ParDo(PostBatchesFn(settings)).with_output_types(
            DeadLetter, **{DEFERRED_TAG: tuple[int, DeferredBatch]}
        ).with_outputs(DEFERRED_TAG, main="undelivered")
        dead_letters = [encoded[DEAD_LETTER_TAG], *replayed_dead, posted.undelivered]
        if not settings.bounded_input:  # a bounded run retries in PostBatches and defers nothing
            retry_later = beam.ParDo(RetryDeferredBatchesFn(settings)).with_output_types(DeadLetter)
            dead_letters.append(posted[DEFERRED_TAG] | "RetryDeferred" >> retry_later)
        # All are in the global window already.
        return tuple(dead_letters) | "Dead letters" >> beam.Flatten()
