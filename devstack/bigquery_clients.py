"""Google BigQuery clients pointed at the local emulator, and dynamic proto rows for the Storage Write API.

The emulator serves plain HTTP and plaintext gRPC without authentication, which changes how clients are built:

* REST: ``AnonymousCredentials`` plus ``client_options={"api_endpoint": "http://..."}``.
* Storage Write/Read: pass the client a gRPC transport built on ``grpc.insecure_channel``. Setting
  ``client_options.api_endpoint`` instead makes the client open TLS against a plaintext port; it then fails the
  handshake and retries silently for minutes rather than raising.

Storage Write gotchas (BigQuery behaves the same):

* ``BigQueryWriteClient.append_rows(requests)`` blocks until the server answers the first request, so when the
  request iterator is fed from a queue, put the first request in before calling it. ``AppendRowsStream`` (in
  ``google.cloud.bigquery_storage_v1.writer``) does this for you: its template request names the stream and
  carries the writer schema, later requests carry only offset and rows.
* Per-request failures arrive as ``AppendRowsResponse.error`` (a ``google.rpc.Status``), not as exceptions:
  ALREADY_EXISTS (6) for an offset that was already written, OUT_OF_RANGE (11) for one past the end,
  INVALID_ARGUMENT (3) with ``row_errors`` for bad rows (the whole request is rejected).
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryReadClient, BigQueryWriteClient, types
from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport
from google.cloud.bigquery_storage_v1.services.big_query_write.transports import BigQueryWriteGrpcTransport
from google.protobuf import descriptor_pb2, message

from transforms.sinks.bigquery_proto import build_message_class, writer_schema

# BigQuery accepts append requests of up to 10 MB; gRPC's default 4 MB limit would reject large batches first.
_MAX_MESSAGE_BYTES = 20 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
)

FieldType = descriptor_pb2.FieldDescriptorProto.Type


def rest_client(api_endpoint: str, project: str) -> bigquery.Client:
    """A ``bigquery.Client`` for the emulator's REST API, e.g. ``rest_client("http://127.0.0.1:29050", "p")``."""
    return bigquery.Client(
        project=project,
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": api_endpoint},
    )


def insecure_channel(target: str) -> grpc.Channel:
    """A plaintext channel to ``host:port`` (no scheme)."""
    return grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)


def write_client(grpc_target: str) -> BigQueryWriteClient:
    """A Storage Write API client over plaintext gRPC, e.g. ``write_client("127.0.0.1:29060")``."""
    return BigQueryWriteClient(transport=BigQueryWriteGrpcTransport(channel=insecure_channel(grpc_target)))


def read_client(grpc_target: str) -> BigQueryReadClient:
    """A Storage Read API client over plaintext gRPC (for ``to_dataframe(bqstorage_client=...)``)."""
    return BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=insecure_channel(grpc_target)))


def proto_message_class(name: str, fields: Mapping[str, FieldType]) -> type[message.Message]:
    """A protobuf message class with one optional field per ``fields`` item, numbered in order (the
    pipeline's own builder). Map BigQuery types as the Storage Write API expects: INT64 -> TYPE_INT64,
    TIMESTAMP -> TYPE_INT64 (microseconds since the epoch), DATE -> TYPE_INT32 (days since the epoch),
    NUMERIC/BIGNUMERIC -> TYPE_STRING (decimal text, exact), JSON/STRING -> TYPE_STRING, BOOL -> TYPE_BOOL,
    FLOAT64 -> TYPE_DOUBLE.
    """
    return build_message_class(name, fields.items(), package="devstack")


def proto_schema(message_class: type[message.Message]) -> types.ProtoSchema:
    """The ``writer_schema`` that describes rows serialized from ``message_class``."""
    return writer_schema(message_class)


def append_request(
    message_class: type[message.Message],
    rows: list[message.Message],
    *,
    write_stream: str,
    offset: int | None = None,
) -> types.AppendRowsRequest:
    """A self-contained AppendRows request (stream name, schema, rows) for a one-shot ``append_rows`` call."""
    request = types.AppendRowsRequest(
        write_stream=write_stream,
        proto_rows=types.AppendRowsRequest.ProtoData(
            writer_schema=proto_schema(message_class),
            rows=types.ProtoRows(serialized_rows=[row.SerializeToString() for row in rows]),
        ),
    )
    if offset is not None:
        # Offsets make retries idempotent: the server answers ALREADY_EXISTS for rows it already has.
        request.offset = offset
    return request
