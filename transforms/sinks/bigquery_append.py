"""Appends through the Storage Write API at explicit offsets: the client, what each answer means, and the
retries. The delivery side of the local writer (``bigquery_local``), which decides what to append where.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import grpc
import tenacity
from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport
from google.protobuf import message
from google.rpc import code_pb2

from transforms.retry import Backoff, retrying
from transforms.sinks.bigquery_proto import refusal_sentinel, writer_schema
from transforms.sinks.bigquery_tables import TableSpec

_log = logging.getLogger(__name__)

# AppendRows accepts up to 10 MB per request; gRPC's default 4 MB cap would refuse big batches first.
_MAX_MESSAGE_BYTES = 20 * 1024 * 1024


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
    """Where a shard writes next: its COMMITTED stream and the offset of the next row; an offset of None
    appends wherever the stream ends (the ``_default`` stream takes no offsets)."""

    stream: str
    offset: int | None


@dataclass
class AppendResult:
    """What one batch's append did. ``rejected`` (index -> BigQuery's reason) is non-empty only for
    ROWS_REJECTED, in which case nothing of the batch was written."""

    outcome: Outcome
    rejected: dict[int, str] = field(default_factory=dict)
    retries: int = 0


class StorageWriteError(RuntimeError):
    """An append that retrying in place cannot fix; the bundle fails and the runner retries it."""


class NoAnswerError(StorageWriteError):
    """The call ended without a response: the server went away (a restart). Retried like UNAVAILABLE."""


_TRANSIENT_APPEND_ERRORS = (
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.Aborted,
    api_exceptions.InternalServerError,
    api_exceptions.TooManyRequests,
    api_exceptions.Cancelled,
    NoAnswerError,
)
_APPEND_BACKOFF = Backoff(initial_seconds=0.2, max_seconds=10.0)
APPEND_RETRY_SECONDS = 120.0
"""How long an append is retried in place: longer than a restart of the emulator (about 20 s) or a regional
hiccup, short enough that a real outage fails the bundle and shows."""


def stream_is_gone(error: api_exceptions.GoogleAPICallError) -> bool:
    """A raised error that says the stream no longer exists: NOT_FOUND (BigQuery), or the emulator's
    INVALID_ARGUMENT for a stream it forgot when it restarted."""
    if isinstance(error, api_exceptions.NotFound):
        return True
    return isinstance(error, api_exceptions.InvalidArgument) and "Invalid stream name" in str(error)


class TableAppender:
    """Appends batches of encoded rows to one table's COMMITTED streams at explicit offsets."""

    def __init__(
        self,
        client: BigQueryWriteClient,
        spec: TableSpec,
        message_class: type[message.Message],
        retry_seconds: float = APPEND_RETRY_SECONDS,
        backoff: Backoff = _APPEND_BACKOFF,
    ) -> None:
        self._client = client
        self._spec = spec
        self._raw_schema = types.ProtoSchema.pb(writer_schema(message_class))
        self._retry_seconds = retry_seconds
        self._backoff = backoff

    def default_stream(self) -> str:
        """The table's ``_default`` stream: rows are committed as each append is acknowledged, at least once."""
        return f"{self._client.table_path(self._spec.project, self._spec.dataset, self._spec.table)}/streams/_default"

    def create_stream(self) -> str:
        parent = self._client.table_path(self._spec.project, self._spec.dataset, self._spec.table)
        stream = types.WriteStream(type_=types.WriteStream.Type.COMMITTED)
        return self._client.create_write_stream(parent=parent, write_stream=stream).name

    def _append_once(self, position: StreamPosition, rows: Sequence[bytes]) -> types.AppendRowsResponse:
        # Built as the raw protobuf and wrapped: proto-plus's constructor converts each of the rows one by one,
        # 9 ms for 5,000 rows against 0.2 ms (docs/benchmarks.md, session 24).
        raw = types.AppendRowsRequest.pb()(write_stream=position.stream)
        if position.offset is not None:
            raw.offset.value = position.offset
        raw.proto_rows.writer_schema.CopyFrom(self._raw_schema)
        raw.proto_rows.rows.serialized_rows.extend(rows)
        request = types.AppendRowsRequest.wrap(raw)
        # One self-contained request per call. append_rows() blocks until the first response, so a
        # request iterator must already hold its first request when the call is made: a one-element list
        # does, a queue filled afterwards would deadlock.
        responses = list(self._client.append_rows(iter([request])))
        if not responses:
            raise NoAnswerError(f"the append to {position.stream} ended without a response")
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
            within_seconds=self._retry_seconds,
        )
        try:
            outcome, response = retry(self._attempt, position, rows)
        except tenacity.RetryError as error:
            raise StorageWriteError(
                f"append to {position.stream} still failing after {self._retry_seconds:g}s of retries"
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
        except api_exceptions.GoogleAPICallError as error:
            if stream_is_gone(error):
                return Outcome.STREAM_GONE, None
            raise
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
