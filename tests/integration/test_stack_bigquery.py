"""The BigQuery emulator behaves like BigQuery where the pipeline's sink depends on it.

Rows go in through the Storage Write API (proto rows, as the sink writes them) and come back through the REST
API (as users query them). Every test works on its own table, so the suite re-runs against a long-lived stack.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal

import pytest
from google.cloud import bigquery
from google.cloud.bigquery_storage_v1 import BigQueryWriteClient, types, writer
from google.protobuf import descriptor_pb2, message
from google.rpc import code_pb2

from devstack import bigquery_clients
from devstack.cli import ensure_tables
from devstack.config import StackConfig

FieldType = descriptor_pb2.FieldDescriptorProto

SCHEMA = [
    bigquery.SchemaField("event_id", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("content_id", "STRING"),
    bigquery.SchemaField("engagement_seconds", "NUMERIC"),
    bigquery.SchemaField("event_ts", "TIMESTAMP"),
    bigquery.SchemaField("raw_payload", "JSON"),
]
# The proto encoding the Storage Write API expects for each column above.
Row = bigquery_clients.proto_message_class(
    "EngagementRow",
    {
        "event_id": FieldType.TYPE_INT64,
        "content_id": FieldType.TYPE_STRING,
        "engagement_seconds": FieldType.TYPE_STRING,
        "event_ts": FieldType.TYPE_INT64,
        "raw_payload": FieldType.TYPE_STRING,
    },
)

EVENT_TS = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.UTC)


def epoch_micros(ts: dt.datetime) -> int:
    return (ts - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


@pytest.fixture(scope="module")
def bq(stack: StackConfig) -> bigquery.Client:
    return bigquery_clients.rest_client(stack.bq_rest_endpoint, stack.bq_project)


@pytest.fixture(scope="module")
def write_client(stack: StackConfig) -> BigQueryWriteClient:
    return bigquery_clients.write_client(stack.bq_grpc_endpoint)


@pytest.fixture
def table(bq: bigquery.Client, stack: StackConfig) -> Iterator[bigquery.Table]:
    table_id = f"{stack.bq_project}.{stack.bq_dataset}.stack_test_{uuid.uuid4().hex[:12]}"
    created = bq.create_table(bigquery.Table(table_id, schema=SCHEMA))
    yield created
    bq.delete_table(created, not_found_ok=True)


def create_stream(client: BigQueryWriteClient, table: bigquery.Table, kind: types.WriteStream.Type) -> str:
    parent = client.table_path(table.project, table.dataset_id, table.table_id)
    return client.create_write_stream(parent=parent, write_stream=types.WriteStream(type_=kind)).name


def append(
    client: BigQueryWriteClient, stream: str, rows: list[message.Message], offset: int
) -> types.AppendRowsResponse:
    """One AppendRows call with one request; returns the server's only response."""
    request = bigquery_clients.append_request(Row, rows, write_stream=stream, offset=offset)
    responses = list(client.append_rows(iter([request])))
    assert len(responses) == 1
    return responses[0]


def event_ids(bq: bigquery.Client, table: bigquery.Table) -> list[int]:
    table_ref = f"{table.project}.{table.dataset_id}.{table.table_id}"
    query = f"SELECT event_id FROM `{table_ref}` ORDER BY event_id"
    return [row.event_id for row in bq.query_and_wait(query)]


def test_committed_stream_rows_are_read_back_through_rest(
    bq: bigquery.Client, write_client: BigQueryWriteClient, table: bigquery.Table
) -> None:
    stream = create_stream(write_client, table, types.WriteStream.Type.COMMITTED)
    first = Row(
        event_id=1,
        content_id="6f1c1e1a-0000-4000-8000-000000000001",
        engagement_seconds="12.345",
        event_ts=epoch_micros(EVENT_TS),
        raw_payload=json.dumps({"app": "ios", "v": [1, 2]}),
    )
    # Unset proto2 fields must arrive as NULL, not as zero values.
    sparse = Row(event_id=2)

    responses = [
        append(write_client, stream, [first, sparse], offset=0),
        append(write_client, stream, [Row(event_id=3)], offset=2),
    ]

    assert [r.error.code for r in responses] == [code_pb2.OK, code_pb2.OK]
    assert [r.append_result.offset for r in responses] == [0, 2]
    rows = {row.event_id: dict(row) for row in bq.list_rows(table)}
    assert sorted(rows) == [1, 2, 3]
    assert rows[1] == {
        "event_id": 1,
        "content_id": "6f1c1e1a-0000-4000-8000-000000000001",
        "engagement_seconds": Decimal("12.345"),
        "event_ts": EVENT_TS,
        "raw_payload": {"app": "ios", "v": [1, 2]},
    }
    assert rows[2] == {
        "event_id": 2,
        "content_id": None,
        "engagement_seconds": None,
        "event_ts": None,
        "raw_payload": None,
    }


def test_resent_offset_is_rejected_with_already_exists(
    bq: bigquery.Client, write_client: BigQueryWriteClient, table: bigquery.Table
) -> None:
    stream = create_stream(write_client, table, types.WriteStream.Type.COMMITTED)
    assert append(write_client, stream, [Row(event_id=10), Row(event_id=11)], offset=0).error.code == code_pb2.OK

    # A retry of a request whose response was lost: same rows, same offset.
    retry = append(write_client, stream, [Row(event_id=10), Row(event_id=11)], offset=0)
    overlapping = append(write_client, stream, [Row(event_id=12)], offset=1)
    beyond_end = append(write_client, stream, [Row(event_id=13)], offset=5)

    assert retry.error.code == code_pb2.ALREADY_EXISTS
    assert overlapping.error.code == code_pb2.ALREADY_EXISTS
    assert beyond_end.error.code == code_pb2.OUT_OF_RANGE
    assert event_ids(bq, table) == [10, 11]


def test_pending_stream_rows_appear_only_after_finalize_and_commit(
    bq: bigquery.Client, write_client: BigQueryWriteClient, table: bigquery.Table
) -> None:
    stream = create_stream(write_client, table, types.WriteStream.Type.PENDING)
    assert append(write_client, stream, [Row(event_id=20), Row(event_id=21)], offset=0).error.code == code_pb2.OK
    assert event_ids(bq, table) == []

    finalized = write_client.finalize_write_stream(name=stream)
    assert finalized.row_count == 2
    assert event_ids(bq, table) == []

    parent = write_client.table_path(table.project, table.dataset_id, table.table_id)
    committed = write_client.batch_commit_write_streams(
        types.BatchCommitWriteStreamsRequest(parent=parent, write_streams=[stream])
    )
    assert list(committed.stream_errors) == []
    assert event_ids(bq, table) == [20, 21]


def test_invalid_rows_reject_the_whole_request(
    bq: bigquery.Client, write_client: BigQueryWriteClient, table: bigquery.Table
) -> None:
    stream = create_stream(write_client, table, types.WriteStream.Type.COMMITTED)
    # event_id is REQUIRED in the table; the proto field is optional, so the row serialises without it.
    response = append(write_client, stream, [Row(event_id=30), Row(content_id="no id")], offset=0)

    assert response.error.code == code_pb2.INVALID_ARGUMENT
    assert [(e.index, e.code) for e in response.row_errors] == [(1, types.RowError.RowErrorCode.FIELDS_ERROR)]
    assert event_ids(bq, table) == []


def test_append_rows_stream_sends_schema_once(
    bq: bigquery.Client, write_client: BigQueryWriteClient, table: bigquery.Table
) -> None:
    """The long-lived connection pattern a streaming sink uses: later requests carry only offset and rows."""
    stream = create_stream(write_client, table, types.WriteStream.Type.COMMITTED)
    template = types.AppendRowsRequest(
        write_stream=stream,
        proto_rows=types.AppendRowsRequest.ProtoData(writer_schema=bigquery_clients.proto_schema(Row)),
    )
    connection = writer.AppendRowsStream(write_client, template)
    try:
        futures = [
            connection.send(
                types.AppendRowsRequest(
                    offset=offset,
                    proto_rows=types.AppendRowsRequest.ProtoData(
                        rows=types.ProtoRows(serialized_rows=[Row(event_id=40 + offset).SerializeToString()])
                    ),
                )
            )
            for offset in range(3)
        ]
        assert [future.result(timeout=30).append_result.offset for future in futures] == [0, 1, 2]
    finally:
        connection.close()
    assert event_ids(bq, table) == [40, 41, 42]


def test_tables_are_applied_once_and_again_when_one_is_missing(stack: StackConfig, bq: bigquery.Client) -> None:
    dataset = f"it_ddl_{uuid.uuid4().hex[:8]}"
    marker = stack.data_dir / "bigquery-ddl" / f"{dataset}.sha256"
    try:
        ensure_tables(stack, dataset)
        applied_at = marker.stat().st_mtime_ns
        view = f"{stack.bq_project}.{dataset}.window_aggregates_current"
        assert bq.get_table(view).view_query

        ensure_tables(stack, dataset)  # everything is there: the DDL is not applied again
        assert marker.stat().st_mtime_ns == applied_at

        bq.delete_table(view)
        ensure_tables(stack, dataset)
        assert marker.stat().st_mtime_ns > applied_at
        assert bq.get_table(view).view_query
    finally:
        bq.delete_dataset(f"{stack.bq_project}.{dataset}", delete_contents=True, not_found_ok=True)
        marker.unlink(missing_ok=True)
