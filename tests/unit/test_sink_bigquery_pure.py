"""The BigQuery sink's pure parts: schemas from the DDL, proto encoding, response rules, dead letters, options."""

import argparse
import json
from datetime import UTC, datetime
from decimal import Decimal

import apache_beam as beam
import pytest
from apache_beam.io.gcp.bigquery import BigQueryDisposition, StorageWriteToBigQuery, WriteToBigQuery
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp
from google.api_core import exceptions as api_exceptions
from google.cloud.bigquery_storage_v1 import types
from google.rpc import code_pb2

from tests.unit.helpers import PODCAST, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.model import DeadLetter, SourceCoordinates, Stage
from transforms.retry import Backoff
from transforms.rows import dead_letter_row, enriched_event_row
from transforms.sinks.bigquery import (
    LOCAL_STORAGE_WRITE,
    TABLES_DDL,
    BigQuerySinkOptions,
    BigQuerySinkSettings,
    WriteRows,
    _BeamStorageWrite,
    beam_table_schema,
    parse_table_columns,
    refused_row_dead_letter,
    to_beam_values,
)
from transforms.sinks.bigquery_append import (
    Outcome,
    StorageWriteError,
    StreamPosition,
    TableAppender,
    classify,
    rejected_rows,
    stream_is_gone,
)
from transforms.sinks.bigquery_proto import (
    chunked,
    encode_row,
    proto_message_class,
    proto_value,
    refusal_sentinel,
    row_json,
    stream_of_row,
)
from transforms.sinks.bigquery_tables import Column, TableSpec
from transforms.sinks.http_intents import intent_row
from transforms.sinks.http_wire import Batch

PROCESSED_AT = datetime(2026, 11, 22, 10, 0, 1, 123456, tzinfo=UTC)
COLUMNS = parse_table_columns(TABLES_DDL.read_text())
EVENTS = TableSpec("p", "d", "enriched_events", COLUMNS["enriched_events"])


def event_row(event_id: int = 7) -> dict:
    return enriched_event_row(enrich(decode_record(plain_event(event_id, 5).value).event, PODCAST), PROCESSED_AT)


# --- schemas ------------------------------------------------------------------------------------------------


def test_the_ddl_gives_every_column_of_the_rows_with_type_and_mode() -> None:
    assert [c.name for c in COLUMNS["enriched_events"]] == list(event_row())
    assert set(COLUMNS) == {"enriched_events", "window_aggregates", "dead_letters", "http_intents"}
    intent = intent_row(Batch.of([(1, b'{"id":1}')]), PROCESSED_AT)
    assert [c.name for c in COLUMNS["http_intents"]] == list(intent)
    assert all(c.required for c in COLUMNS["http_intents"])
    by_name = {c.name: c for c in COLUMNS["enriched_events"]}
    assert by_name["event_id"] == Column("event_id", "INT64", required=True)
    assert by_name["engagement_pct"] == Column("engagement_pct", "NUMERIC", required=False)
    assert by_name["processed_at"] == Column("processed_at", "TIMESTAMP", required=True)
    assert {c.name: c.type for c in COLUMNS["dead_letters"]}["payload_bytes"] == "BYTES"


def test_an_unreadable_column_line_is_an_error_not_a_skipped_column() -> None:
    with pytest.raises(ValueError, match="cannot read a column"):
        parse_table_columns("CREATE TABLE `p.d.t` (\n    id INT64,\n    'quoted' STRING\n)\n")


def test_beam_schema_marks_required_columns() -> None:
    fields = beam_table_schema(COLUMNS["dead_letters"])["fields"]
    assert fields[0] == {"name": "stage", "type": "STRING", "mode": "REQUIRED"}
    assert fields[2] == {"name": "payload_text", "type": "STRING", "mode": "NULLABLE"}


# --- proto rows ---------------------------------------------------------------------------------------------


def test_an_event_row_encodes_as_the_storage_write_api_expects() -> None:
    message_class = proto_message_class(EVENTS)
    decoded = message_class.FromString(encode_row(message_class, EVENTS, event_row() | {"user_id": None}))
    assert decoded.event_id == 7
    assert decoded.engagement_seconds == "1.000"  # NUMERIC as exact decimal text
    assert decoded.processed_at == 1795341601123456  # TIMESTAMP as microseconds since the epoch
    assert decoded.content_missing is False
    assert not decoded.HasField("user_id")  # NULL stays unset, not ""


def test_numeric_text_has_no_exponent_and_timestamps_need_a_zone() -> None:
    numeric = Column("n", "NUMERIC")
    assert proto_value(numeric, Decimal("1E+3")) == "1000"
    assert proto_value(numeric, Decimal("-0.125")) == "-0.125"
    with pytest.raises(TypeError):
        proto_value(numeric, 0.1)  # a float would already have lost exactness
    with pytest.raises(ValueError, match="naive"):
        proto_value(Column("t", "TIMESTAMP"), datetime(2026, 1, 1))
    assert proto_value(Column("t", "TIMESTAMP"), Timestamp(micros=5)) == 5


def test_a_row_with_a_column_the_table_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="not in enriched_events"):
        encode_row(proto_message_class(EVENTS), EVENTS, event_row() | {"extra": 1})


def test_a_refused_row_reads_back_as_json_with_its_values() -> None:
    letters = TableSpec("p", "d", "dead_letters", COLUMNS["dead_letters"])
    letter = DeadLetter.of(
        Stage.DECODE, "bad", b"\xff", SourceCoordinates(kind="kafka", topic="t", partition=1, offset=2)
    )
    message_class = proto_message_class(letters)
    document = json.loads(row_json(message_class, letters, encode_row(message_class, letters, dead_letter_row(letter))))
    assert document["payload_bytes"] == "/w=="  # base64
    assert document["failed_at"] == letter.failed_at.isoformat()
    assert (document["source_offset"], document["event_id"]) == (2, None)


def test_shards_are_stable_and_in_range() -> None:
    rows = [bytes([i]) * 10 for i in range(100)]
    shards = [stream_of_row(row, 4) for row in rows]
    assert shards == [stream_of_row(row, 4) for row in rows]
    assert set(shards) == {0, 1, 2, 3}


def test_chunks_keep_order_and_read_lazily() -> None:
    rows = [bytes([n]) for n in range(7)]
    assert list(chunked(rows, 3)) == [rows[0:3], rows[3:6], rows[6:]]
    assert list(chunked([], 3)) == []

    def endless():  # a group bigger than memory is never read whole
        n = 0
        while True:
            yield n.to_bytes(8, "big")
            n += 1

    assert next(chunked(endless(), 2)) == [(0).to_bytes(8, "big"), (1).to_bytes(8, "big")]
    with pytest.raises(ValueError, match="positive"):
        next(chunked(rows, 0))


def test_chunks_stay_under_the_request_size_limit() -> None:
    rows = [b"a" * 4, b"b" * 4, b"c" * 4, b"d" * 20, b"e"]
    # At most 10 bytes a chunk; a row larger than that goes alone (the API will say if it is too large).
    assert list(chunked(rows, 100, max_bytes=10)) == [[b"aaaa", b"bbbb"], [b"cccc"], [b"d" * 20], [b"e"]]


def test_the_probe_sentinel_leaves_every_required_column_null() -> None:
    message_class = proto_message_class(EVENTS)
    sentinel = message_class.FromString(refusal_sentinel(EVENTS))
    assert [c.name for c in EVENTS.columns if c.required and sentinel.HasField(c.name)] == []
    assert any(c.required for c in EVENTS.columns)


def test_a_table_without_required_columns_cannot_be_probed() -> None:
    optional_only = TableSpec("p", "d", "loose", (Column("a", "INT64"), Column("b", "STRING")))
    with pytest.raises(ValueError, match="no REQUIRED column"):
        refusal_sentinel(optional_only)


@pytest.mark.parametrize("streaming", [False, True])
def test_the_local_writer_is_told_whether_the_run_is_bounded(streaming: bool) -> None:
    settings = BigQuerySinkSettings(
        project="p", dataset="d", write_method=LOCAL_STORAGE_WRITE, endpoint="h:1", streaming=streaming
    )
    local = WriteRows(EVENTS, settings)._local_settings()
    assert local.streaming is streaming


# --- AppendRows responses -----------------------------------------------------------------------------------


def response(code: int | None = None, row_errors: tuple[int, ...] = ()) -> types.AppendRowsResponse:
    if code is None:
        return types.AppendRowsResponse(append_result=types.AppendRowsResponse.AppendResult())
    return types.AppendRowsResponse(
        error={"code": code, "message": "m"},
        row_errors=[
            types.RowError(index=i, code=types.RowError.RowErrorCode.FIELDS_ERROR, message=f"bad {i}")
            for i in row_errors
        ],
    )


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (response(), Outcome.WRITTEN),
        (response(code_pb2.ALREADY_EXISTS), Outcome.ALREADY_WRITTEN),
        (response(code_pb2.INVALID_ARGUMENT, row_errors=(1,)), Outcome.ROWS_REJECTED),
        (response(code_pb2.INVALID_ARGUMENT), Outcome.FATAL),  # e.g. a schema mismatch: retrying cannot help
        (response(code_pb2.OUT_OF_RANGE), Outcome.FATAL),  # our offset is past the end: never guess
        (response(code_pb2.NOT_FOUND), Outcome.STREAM_GONE),
        (response(code_pb2.UNAVAILABLE), Outcome.TRANSIENT),
        (response(code_pb2.RESOURCE_EXHAUSTED), Outcome.TRANSIENT),
    ],
)
def test_responses_are_classified(answer: types.AppendRowsResponse, outcome: Outcome) -> None:
    assert classify(answer) is outcome


def test_a_forgotten_stream_is_told_from_other_refusals() -> None:
    assert stream_is_gone(api_exceptions.NotFound("Requested entity was not found"))
    # The emulator's answer for a stream it forgot when it restarted.
    assert stream_is_gone(api_exceptions.InvalidArgument("Invalid stream name. Entity: projects/p/streams/x"))
    assert not stream_is_gone(api_exceptions.InvalidArgument("Input schema has more fields than the table"))


class AnswersInTurn:
    """A write client whose append_rows answers from a script: a list of responses, or an exception."""

    def __init__(self, *answers: list[types.AppendRowsResponse] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def append_rows(self, requests):
        list(requests)
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return iter(answer)


def appender_on(client: AnswersInTurn, retry_seconds: float = 5.0) -> TableAppender:
    spec = TableSpec("p", "d", "t", (Column("id", "INT64", required=True),))
    return TableAppender(client, spec, proto_message_class(spec), retry_seconds, Backoff(0.001, 0.002))


def test_an_append_that_ends_without_an_answer_is_retried() -> None:
    # A restart of the emulator cancels the calls in flight: the response stream ends empty.
    client = AnswersInTurn([], api_exceptions.ServiceUnavailable("connection refused"), [response()])
    result = appender_on(client).append(StreamPosition("s", 0), [b""])
    assert (result.outcome, result.retries, client.calls) == (Outcome.WRITTEN, 2, 3)


def test_a_stream_the_server_forgot_is_reported_not_raised() -> None:
    client = AnswersInTurn(api_exceptions.InvalidArgument("Invalid stream name. Entity: s"))
    assert appender_on(client).append(StreamPosition("s", 0), [b""]).outcome is Outcome.STREAM_GONE


def test_an_append_still_failing_after_its_retry_time_fails_the_bundle() -> None:
    client = AnswersInTurn(*[api_exceptions.ServiceUnavailable("down")] * 1000)
    with pytest.raises(StorageWriteError, match=r"still failing after 0\.05s"):
        appender_on(client, retry_seconds=0.05).append(StreamPosition("s", 0), [b""])


def test_row_errors_carry_bigquerys_reason_per_index() -> None:
    assert rejected_rows(response(code_pb2.INVALID_ARGUMENT, row_errors=(0, 2))) == {
        0: "BigQuery rejected the row (FIELDS_ERROR): bad 0",
        2: "BigQuery rejected the row (FIELDS_ERROR): bad 2",
    }


# --- dead letters -------------------------------------------------------------------------------------------


def test_a_refused_event_points_at_its_source_row() -> None:
    letter = refused_row_dead_letter("enriched_events", json.dumps({"event_id": 42, "x": 1}), "too big")
    assert (letter.stage, letter.reason, letter.event_id) == (Stage.BIGQUERY, "enriched_events: too big", 42)
    assert letter.source == SourceCoordinates(kind="postgres", table="engagement_events", row_id=42)
    assert json.loads(letter.payload_bytes) == {"event_id": 42, "x": 1}


def test_a_refused_dead_letter_keeps_its_own_coordinates() -> None:
    row = {"source_kind": "kafka", "source_topic": "t", "source_partition": 3, "source_offset": 9, "event_id": None}
    letter = refused_row_dead_letter("dead_letters", json.dumps(row), "r")
    assert letter.source == SourceCoordinates(kind="kafka", topic="t", partition=3, offset=9)


# --- Beam's Storage Write route -----------------------------------------------------------------------------


def test_rows_convert_to_the_beam_rows_the_java_sink_takes() -> None:
    """Beam's own dict -> Row conversion (the step before the Java transform) accepts our values."""
    schema = beam_table_schema(EVENTS.columns)
    with test_pipeline.TestPipeline() as p:
        rows = (
            p
            | beam.Create([event_row()])
            | beam.Map(to_beam_values, EVENTS.columns)
            | StorageWriteToBigQuery.ConvertToBeamRows(schema, False).with_output_types()
        )
        assert_that(
            rows | beam.Map(lambda r: (r.event_id, r.engagement_seconds, r.processed_at, r.content_missing)),
            equal_to([(7, Decimal("1.000"), Timestamp.from_utc_datetime(PROCESSED_AT), False)]),
        )


def test_the_beam_route_passes_every_knob() -> None:
    settings = BigQuerySinkSettings(
        project="my-project",
        dataset="analytics",
        use_at_least_once=True,
        num_streams=3,
        auto_sharding=True,
        triggering_frequency_seconds=2.5,
        create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
        streaming=True,
    )
    write = _BeamStorageWrite(settings.table_spec("enriched_events", "events_v2"), settings).write_transform()
    assert write.method == WriteToBigQuery.Method.STORAGE_WRITE_API
    assert (write.table_reference.projectId, write.table_reference.datasetId) == ("my-project", "analytics")
    assert write.table_reference.tableId == "events_v2"
    assert (write.use_at_least_once, write.with_auto_sharding, write._num_storage_api_streams) == (True, True, 3)
    assert write.triggering_frequency == 2.5
    assert write.create_disposition == BigQueryDisposition.CREATE_IF_NEEDED
    assert write.write_disposition == BigQueryDisposition.WRITE_APPEND


def test_batch_runs_leave_streaming_only_knobs_unset() -> None:
    settings = BigQuerySinkSettings(
        project="my-project", dataset="analytics", auto_sharding=True, triggering_frequency_seconds=2.5
    )
    write = _BeamStorageWrite(settings.table_spec("dead_letters", "dead_letters"), settings).write_transform()
    assert (write.triggering_frequency, write.with_auto_sharding) == (None, False)


# --- options ------------------------------------------------------------------------------------------------


def test_options_become_settings() -> None:
    options = PipelineOptions(
        [
            "--project=proj",
            "--bigquery_write_method=local_storage_write",
            "--bigquery_endpoint=127.0.0.1:1",
            "--bigquery_num_streams=2",
            "--bigquery_events_table=e2",
        ]
    )
    settings = BigQuerySinkSettings.from_options(options)
    assert (settings.project, settings.dataset, settings.events_table) == ("proj", "engagement", "e2")
    assert (settings.write_method, settings.endpoint, settings.num_streams) == (LOCAL_STORAGE_WRITE, "127.0.0.1:1", 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"write_method": LOCAL_STORAGE_WRITE}, "needs --bigquery_endpoint"),
        (
            {"write_method": LOCAL_STORAGE_WRITE, "endpoint": "h:1", "create_disposition": "CREATE_IF_NEEDED"},
            "does not create tables",
        ),
        ({"write_method": "insert_all"}, "must be one of"),
    ],
)
def test_settings_refuse_what_the_writer_cannot_do(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BigQuerySinkSettings(project="p", dataset="d", **overrides)


def test_every_option_has_help() -> None:
    parser = argparse.ArgumentParser()
    BigQuerySinkOptions._add_argparse_args(parser)
    actions = [a for a in parser._actions if a.dest != "help"]
    assert len(actions) == 17
    assert all(a.help and len(a.help) > 20 for a in actions), [a.dest for a in actions if not a.help]


# --- batching within a bundle (streaming) ---------------------------------------------------------------------
