"""The BigQuery sink against the emulator: rows land as written, exactly once, and refused rows become dead letters.

Replays are driven by hand: the batch writer (``AppendGroupFn``) is run again on the same group, the streaming
writer (``AppendBatchesFn``) with its state commit and rollback made explicit.

Every test module run uses its own dataset (created with scripts/bigquery-ddl), so the suite re-runs against a
long-lived stack; every test writes its own event ids.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from google.cloud import bigquery

from devstack.config import StackConfig
from tests.unit.helpers import PODCAST, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.model import DeadLetter, EnrichedEvent, SourceCoordinates, Stage
from transforms.rows import enriched_event_row
from transforms.sinks.bigquery import (
    LOCAL_STORAGE_WRITE,
    BigQuerySinkSettings,
    WriteDeadLetters,
    WriteEnrichedEvents,
    WriteRows,
)
from transforms.sinks.bigquery_local import AppendBatchesFn, AppendGroupFn, create_streams
from transforms.sinks.bigquery_proto import encode_row, proto_message_class

ROOT = Path(__file__).resolve().parents[2]
_ids = itertools.count(int(uuid.uuid4().int % 10**12) * 1000)


def new_ids(count: int) -> list[int]:
    """Event ids no other test (or earlier run) used."""
    return [next(_ids) for _ in range(count)]


@pytest.fixture(scope="module")
def settings(stack: StackConfig, dataset: str) -> BigQuerySinkSettings:
    return BigQuerySinkSettings(
        project=stack.bq_project,
        dataset=dataset,
        write_method=LOCAL_STORAGE_WRITE,
        endpoint=stack.bq_grpc_endpoint,
        num_streams=2,
        batch_size=3,  # several batches per shard even with a handful of rows
    )


def enriched(event_id: int, **event_fields: Any) -> EnrichedEvent:
    event = decode_record(plain_event(event_id, event_id % 50, **event_fields).value).event
    return enrich(event, PODCAST)


def rows_by_id(bq: bigquery.Client, table_id: str, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    found: dict[int, list[dict[str, Any]]] = {}
    id_list = ", ".join(str(i) for i in ids)
    # Only this test's ids: other tests share the table.
    for row in bq.query_and_wait(f"SELECT * FROM `{table_id}` WHERE event_id IN ({id_list})"):
        found.setdefault(row["event_id"], []).append(dict(row))
    return found


def without_processed_at(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "processed_at"}


def test_enriched_events_are_read_back_as_written(bq: bigquery.Client, settings: BigQuerySinkSettings) -> None:
    ids = new_ids(7)
    events = [enriched(i) for i in ids[:5]]
    events += [enriched(ids[5], duration_ms=None, user=None, event_type=None), enriched(ids[6], content=None)]
    started = datetime.now(UTC)

    with test_pipeline.TestPipeline() as p:
        refused = p | beam.Create(events) | WriteEnrichedEvents(settings)
        assert_that(refused, equal_to([]))

    stored = rows_by_id(bq, f"{settings.project}.{settings.dataset}.enriched_events", ids)
    assert sorted(stored) == ids
    for event in events:
        (row,) = stored[event.event.id]
        assert without_processed_at(row) == without_processed_at(enriched_event_row(event, started))
        assert started - timedelta(seconds=1) <= row["processed_at"] <= datetime.now(UTC)


def test_batch_graph_keeps_no_state_and_sets_no_timers(settings: BigQuerySinkSettings) -> None:
    """State and timers of the global window expire with it in a bounded run, before GroupIntoBatches' last
    flush: Prism garbage-collected the writer's offsets, and rows appended at offset 0 again were counted as
    written. The batch graph must hold neither; the streaming graph does (so this test can tell them apart)."""
    spec = settings.table_spec("enriched_events", "enriched_events")

    def stateful_transforms(streaming: bool, triggering_frequency_seconds: float = 5.0) -> list[str]:
        p = beam.Pipeline()
        changed = dataclasses.replace(
            settings, streaming=streaming, triggering_frequency_seconds=triggering_frequency_seconds
        )
        _ = p | beam.Create([]) | WriteRows(spec, changed)
        found = []
        for transform in p.to_runner_api().components.transforms.values():
            if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
                payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
                if payload.state_specs or payload.timer_family_specs:
                    found.append(transform.unique_name)
        return found

    assert stateful_transforms(streaming=False) == []
    # Streaming: the offsets, and batches held across bundles for at most the triggering frequency (cheap
    # now that Prism sends state cache tokens, devstack/prism-patches/0003); 0 batches within bundles.
    offsets, buffered = sorted(stateful_transforms(streaming=True))
    assert offsets.endswith("/Append at offsets")
    assert "/Batch per stream/" in buffered
    (only_offsets,) = stateful_transforms(streaming=True, triggering_frequency_seconds=0)
    assert only_offsets.endswith("/Append at offsets")


def _group_writer(stack: StackConfig, settings: BigQuerySinkSettings, row_lists: bool) -> Iterator[AppendGroupFn]:
    spec = settings.table_spec("enriched_events", "enriched_events")
    stream, probe = create_streams(stack.bq_grpc_endpoint, spec, 2)
    fn = AppendGroupFn(spec, stack.bq_grpc_endpoint, [stream], probe, batch_size=3, row_lists=row_lists)
    fn.setup()
    yield fn
    fn.teardown()


@pytest.fixture
def group_writer(stack: StackConfig, settings: BigQuerySinkSettings) -> Iterator[AppendGroupFn]:
    """The batch writer for shard 0, on a fresh stream, appending chunks of 3 rows."""
    yield from _group_writer(stack, settings, row_lists=False)


@pytest.fixture
def list_group_writer(stack: StackConfig, settings: BigQuerySinkSettings) -> Iterator[AppendGroupFn]:
    """The same writer for a group of lists of rows (the backfill's, transforms/lists.py)."""
    yield from _group_writer(stack, settings, row_lists=True)


class WorkerDiedError(Exception):
    pass


def dies_after(rows: list[bytes], count: int) -> Iterator[bytes]:
    """The group as a worker reads it, dying after ``count`` rows (mid-chunk, after some appends)."""
    yield from rows[:count]
    raise WorkerDiedError


def test_replayed_group_leaves_each_row_once(
    bq: bigquery.Client, settings: BigQuerySinkSettings, group_writer: AppendGroupFn
) -> None:
    """A retried bundle iterates the same group again; the appends it repeats find ALREADY_EXISTS."""
    ids = new_ids(8)
    group = encoded_events(settings, ids)

    with pytest.raises(WorkerDiedError):
        list(group_writer.process((0, dies_after(group, 5))))  # chunk 1 written, chunk 2 half read
    assert copies(bq, settings, ids) == dict.fromkeys(ids[:3], 1)
    assert list(group_writer.process((0, group))) == []
    assert list(group_writer.process((0, group))) == []  # died after the last append: replayed in full

    assert copies(bq, settings, ids) == dict.fromkeys(ids, 1)


def test_a_replayed_group_of_row_lists_leaves_each_row_once(
    bq: bigquery.Client, settings: BigQuerySinkSettings, list_group_writer: AppendGroupFn
) -> None:
    """Lists of 2 rows appended in chunks of 3: chunks cut across lists, and a replay repeats them all."""
    ids = new_ids(9)
    group = encoded_events(settings, ids)
    lists = [group[i : i + 2] for i in range(0, len(group), 2)]

    with pytest.raises(WorkerDiedError):
        list(list_group_writer.process((0, dies_after(lists, 2))))  # 4 rows read: chunk 1 written
    assert copies(bq, settings, ids) == dict.fromkeys(ids[:3], 1)
    assert list(list_group_writer.process((0, lists))) == []
    assert list(list_group_writer.process((0, lists))) == []

    assert copies(bq, settings, ids) == dict.fromkeys(ids, 1)


def test_replayed_group_with_refused_rows_emits_the_same_dead_letters(
    bq: bigquery.Client, settings: BigQuerySinkSettings, group_writer: AppendGroupFn
) -> None:
    """Chunks of 3: [ok, refused, ok] [ok, ok, ok] [refused, refused, refused] [ok]. Each attempt emits the same
    dead letters, though a replay meets ALREADY_EXISTS where the first attempt met the refusals."""
    ids = new_ids(10)
    overflow = {"engagement_seconds": Decimal("1e30")}
    refused_ids = [ids[1], ids[6], ids[7], ids[8]]
    group = encoded_events(settings, ids, dict.fromkeys(refused_ids, overflow))
    by_row = dict(zip(group, ids, strict=True))

    def dead_letters(attempt: Iterator[tuple[bytes, str]]) -> list[tuple[int, bool]]:
        return sorted((by_row[row], "Cannot convert value to numeric" in reason) for row, reason in attempt)

    with pytest.raises(WorkerDiedError):
        list(group_writer.process((0, dies_after(group, 7))))  # the first two chunks written
    for _ in range(3):  # the bundle that finishes, then two replays of it
        assert dead_letters(group_writer.process((0, group))) == [(i, True) for i in refused_ids]

    good = [i for i in ids if i not in refused_ids]
    assert copies(bq, settings, ids) == dict.fromkeys(good, 1)


class Shard:
    """Shard 0 of the streaming writer (AppendBatchesFn), fed as the runner would, with its commit and rollback
    made explicit."""

    def __init__(self, fn: AppendBatchesFn) -> None:
        self.fn = fn
        self.offset, self.stream, self.parked, self.timer = FakeState(), FakeState(), FakeBag(), FakeTimer()

    def bundle(self, *batches: list[bytes]) -> list[tuple[bytes, str]]:
        """One bundle of ``batches``; returns its output (the rows refused)."""
        self.fn.start_bundle()
        now, window = Timestamp.now(), GlobalWindow()
        out = []
        for batch in batches:
            out += self.fn.process((0, batch), self.offset, self.stream, self.parked, self.timer, now, window)
        return out

    def fire_timer(self) -> list[tuple[bytes, str]]:
        assert self.timer.set_at is not None, "no timer was set"
        self.timer.set_at = None
        self.fn.start_bundle()
        return list(self.fn.flush_parked(0, self.offset, self.stream, self.parked, self.timer, Timestamp.now()))

    def commit(self) -> None:
        self.offset.commit(), self.stream.commit(), self.parked.commit(), self.timer.commit()

    def crash(self) -> None:
        self.offset.rollback(), self.stream.rollback(), self.parked.rollback(), self.timer.rollback()


@pytest.fixture
def shard(stack: StackConfig, settings: BigQuerySinkSettings) -> Iterator[Shard]:
    spec = settings.table_spec("enriched_events", "enriched_events")
    fn = AppendBatchesFn(spec, stack.bq_grpc_endpoint, create_streams(stack.bq_grpc_endpoint, spec, 1))
    fn.setup()
    yield Shard(fn)
    fn.teardown()


def encoded_events(
    settings: BigQuerySinkSettings, ids: list[int], overrides: dict[int, dict[str, Any]] | None = None
) -> list[bytes]:
    spec = settings.table_spec("enriched_events", "enriched_events")
    message_class = proto_message_class(spec)
    now = datetime.now(UTC)
    return [
        encode_row(message_class, spec, enriched_event_row(enriched(i), now) | (overrides or {}).get(i, {}))
        for i in ids
    ]


def copies(bq: bigquery.Client, settings: BigQuerySinkSettings, ids: list[int]) -> dict[int, int]:
    stored = rows_by_id(bq, f"{settings.project}.{settings.dataset}.enriched_events", ids)
    return {event_id: len(rows) for event_id, rows in stored.items()}


def test_replayed_bundles_leave_each_row_once(
    bq: bigquery.Client, settings: BigQuerySinkSettings, shard: Shard
) -> None:
    """Bundles that die after their append but before their state is committed are replayed from the old state."""
    ids = new_ids(7)
    first, second, third = (
        encoded_events(settings, ids[:4]),
        encoded_events(settings, ids[4:6]),
        encoded_events(settings, ids[6:]),
    )

    assert shard.bundle(first) == []
    assert shard.offset.uncommitted == 4
    shard.crash()  # died after the append: the replay finds ALREADY_EXISTS at offset 0
    assert shard.bundle(first) == []
    shard.commit()

    for _ in range(2):  # a two-batch bundle dies twice
        assert shard.bundle(second, third) == []
        shard.crash()
    assert shard.bundle(second, third) == []
    shard.commit()

    assert shard.offset.committed == 7
    assert copies(bq, settings, ids) == dict.fromkeys(ids, 1)


def test_an_append_over_four_mib_lands_as_on_bigquery(
    bq: bigquery.Client, settings: BigQuerySinkSettings, shard: Shard
) -> None:
    """BigQuery takes AppendRows requests up to 10 MB, and so must its stand-in: gRPC's default limit of 4 MiB
    refused a busy HTTP sink's intent append, which was retried until the job stopped."""
    ids = new_ids(50)
    padding = json.dumps({"padding": "x" * 100_000})
    rows = encoded_events(settings, ids, {event_id: {"raw_payload": padding} for event_id in ids})
    assert sum(map(len, rows)) > 4 * 1024 * 1024
    assert shard.bundle(rows) == []
    shard.commit()
    assert copies(bq, settings, ids) == dict.fromkeys(ids, 1)


def test_a_lost_stream_is_replaced_and_every_row_lands_once(
    stack: StackConfig, bq: bigquery.Client, settings: BigQuerySinkSettings
) -> None:
    """The emulator forgets its write streams when it restarts; the shard goes on in a new one."""
    spec = settings.table_spec("enriched_events", "enriched_events")
    [created] = create_streams(stack.bq_grpc_endpoint, spec, 1)
    forgotten = created.rsplit("/", 1)[0] + "/" + uuid.uuid4().hex  # a stream the emulator does not know
    fn = AppendBatchesFn(spec, stack.bq_grpc_endpoint, [forgotten])
    fn.setup()
    try:
        shard = Shard(fn)
        ids = new_ids(5)
        assert shard.bundle(encoded_events(settings, ids[:3])) == []
        shard.commit()
        assert shard.bundle(encoded_events(settings, ids[3:])) == []
        shard.commit()
    finally:
        fn.teardown()

    assert shard.stream.committed not in (None, forgotten)
    assert shard.offset.committed == 5  # both batches in the new stream, from offset 0
    assert copies(bq, settings, ids) == dict.fromkeys(ids, 1)


def test_replayed_batch_with_refused_rows_keeps_offsets_and_dead_letters(
    bq: bigquery.Client, settings: BigQuerySinkSettings, shard: Shard
) -> None:
    ids = new_ids(8)
    opening = encoded_events(settings, ids[:2])
    mixed = encoded_events(settings, ids[2:6], {ids[3]: {"engagement_seconds": Decimal("1e30")}})
    behind = encoded_events(settings, ids[6:])
    assert shard.bundle(opening) == []
    shard.commit()

    # The refused row is dead-lettered by the bundle that met it; the valid rest, and the batch behind it,
    # wait for a later bundle. The bundle dies once and is replayed with the same result.
    for attempt in range(2):
        refused = shard.bundle(mixed, behind)
        assert [(row, "Cannot convert value to numeric" in reason) for row, reason in refused] == [(mixed[1], True)]
        assert [rows for _, rows in shard.parked.uncommitted] == [[mixed[0], mixed[2], mixed[3]], behind]
        assert shard.offset.uncommitted == 2
        if attempt == 0:
            shard.crash()
    shard.commit()

    # The timer's bundle appends the parked batches, dies, and its replay finds them written.
    assert shard.fire_timer() == []
    assert shard.offset.uncommitted == 7
    shard.crash()
    assert shard.fire_timer() == []
    shard.commit()

    assert (shard.offset.committed, shard.parked.committed) == (7, [])
    assert copies(bq, settings, ids) == {i: 1 for i in ids if i != ids[3]}


def test_refused_rows_become_dead_letters_and_the_rest_land(
    bq: bigquery.Client, settings: BigQuerySinkSettings
) -> None:
    good_ids = new_ids(4)
    overflow_id, missing_id = new_ids(2)
    now = datetime.now(UTC)
    rows = [enriched_event_row(enriched(i), now) for i in good_ids]
    overflow = enriched_event_row(enriched(overflow_id), now) | {"engagement_seconds": Decimal("1e30")}
    # content_missing is REQUIRED: the emulator refuses the row, as BigQuery does.
    missing_required = enriched_event_row(enriched(missing_id), now) | {"content_missing": None}
    rows[1:1] = [overflow, missing_required]
    spec = settings.table_spec("enriched_events", "enriched_events")

    # assert_that groups its input: on the batch DirectRunner, dead letters that reached it after the end of
    # the global window used to be dropped as late (GroupIntoBatches' end-of-window flush). They must not be.
    def check(letters: list[DeadLetter]) -> None:
        assert sorted((d.stage, d.event_id, d.source.row_id) for d in letters) == [
            (Stage.BIGQUERY, i, i) for i in (overflow_id, missing_id)
        ]
        reasons = {d.event_id: d.reason for d in letters}
        assert reasons[overflow_id] == (
            "enriched_events: BigQuery rejected the row (FIELDS_ERROR): "
            "Cannot convert value to numeric (bad value): 1000000000000000000000000000000"
        )
        assert reasons[missing_id].startswith("enriched_events: BigQuery rejected the row (FIELDS_ERROR): ")
        overflow = next(d for d in letters if d.event_id == overflow_id)
        assert json.loads(overflow.payload_text)["engagement_seconds"] == "1000000000000000000000000000000"

    with test_pipeline.TestPipeline() as p:
        assert_that(p | beam.Create(rows) | WriteRows(spec, settings), check)

    stored = rows_by_id(bq, spec.table_id, [*good_ids, overflow_id, missing_id])
    assert sorted(stored) == good_ids


def test_dead_letters_table_is_written(bq: bigquery.Client, settings: BigQuerySinkSettings) -> None:
    (event_id,) = new_ids(1)
    reason = f"test {uuid.uuid4()}"
    letters = [
        DeadLetter.of(
            Stage.DECODE,
            reason,
            b"\xff not utf-8",
            SourceCoordinates(kind="kafka", topic="events", partition=3, offset=42),
        ),
        DeadLetter.of(
            Stage.HTTP, reason, b'{"id": 1}', SourceCoordinates(kind="postgres", table="t", row_id=7), event_id
        ),
    ]

    with test_pipeline.TestPipeline() as p:
        unwritten = p | beam.Create(letters) | WriteDeadLetters(settings)
        assert_that(unwritten, equal_to([]))

    query = f"SELECT * FROM `{settings.project}.{settings.dataset}.dead_letters` WHERE reason = @reason"
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter("reason", "STRING", reason)])
    stored = sorted((dict(row) for row in bq.query_and_wait(query, job_config=config)), key=lambda r: r["stage"])
    assert [
        (r["stage"], r["payload_bytes"], r["source_offset"], r["source_row_id"], r["event_id"]) for r in stored
    ] == [
        ("decode", b"\xff not utf-8", 42, None, None),
        ("http", b'{"id": 1}', None, 7, event_id),
    ]
    assert stored[0]["payload_text"] == "\ufffd not utf-8"
    assert stored[0]["failed_at"] == letters[0].failed_at


def test_unique_view_keeps_the_first_copy_of_each_event(bq: bigquery.Client, settings: BigQuerySinkSettings) -> None:
    """Copies beyond the pipeline's horizon (e.g. an overlapping backfill) are hidden by enriched_events_unique."""
    ids = new_ids(2)
    first, later = datetime.now(UTC) - timedelta(minutes=5), datetime.now(UTC)
    rows = [enriched_event_row(enriched(i), first) for i in ids] + [enriched_event_row(enriched(ids[0]), later)]
    spec = settings.table_spec("enriched_events", "enriched_events")
    with test_pipeline.TestPipeline() as p:
        _ = p | beam.Create(rows) | WriteRows(spec, settings)

    table = f"{settings.project}.{settings.dataset}"
    assert {i: len(c) for i, c in rows_by_id(bq, f"{table}.enriched_events", ids).items()} == {ids[0]: 2, ids[1]: 1}
    unique = rows_by_id(bq, f"{table}.enriched_events_unique", ids)
    assert {i: [r["processed_at"] for r in c] for i, c in unique.items()} == {ids[0]: [first], ids[1]: [first]}


# Beam's state and timer parameters, as the runner passes them, with the runner's commit/rollback made explicit.


class FakeState:
    def __init__(self) -> None:
        self.committed: Any = None
        self.uncommitted: Any = None

    def read(self) -> Any:
        return self.uncommitted

    def write(self, value: Any) -> None:
        self.uncommitted = value

    def commit(self) -> None:
        self.committed = self.uncommitted

    def rollback(self) -> None:
        self.uncommitted = self.committed


class FakeBag:
    def __init__(self) -> None:
        self.committed: list[Any] = []
        self.uncommitted: list[Any] = []

    def read(self) -> list[Any]:
        return list(self.uncommitted)

    def add(self, value: Any) -> None:
        self.uncommitted.append(value)

    def clear(self) -> None:
        self.uncommitted = []

    def commit(self) -> None:
        self.committed = list(self.uncommitted)

    def rollback(self) -> None:
        self.uncommitted = list(self.committed)


class FakeTimer:
    def __init__(self) -> None:
        self.set_at: Any = None
        self._committed: Any = None

    def set(self, timestamp: Any) -> None:
        self.set_at = timestamp

    def commit(self) -> None:
        self._committed = self.set_at

    def rollback(self) -> None:
        self.set_at = self._committed
