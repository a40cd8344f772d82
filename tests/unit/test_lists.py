"""Lists of events through the shared graph (transforms/lists.py): the same results as one event at a time."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import apache_beam as beam
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from pipelines.core import CoreSettings, build_core
from tests.unit.helpers import PODCAST, VIDEO, plain_event, snapshot
from transforms.aggregate import AggregateWindows, SumListsPerWindowFn, WindowSettings
from transforms.enrich import enrich
from transforms.lists import ForEachInList, items, lists_per_key
from transforms.model import DeadLetter, EngagementEvent, EnrichedEvent, RawRecord, WindowAggregate

PER_EVENT = CoreSettings(streaming=False, ids_unique_at_source=True)
IN_LISTS = CoreSettings(streaming=False, ids_unique_at_source=True, event_lists=True)

# Unique ids (a bounded source's) across three windows, with every outcome: both contents, content missing,
# NULL duration and user, a bad event type and an unreadable record (dead letters).
RECORDS: list[RawRecord] = [
    *(
        plain_event(i, i % 170, content=(PODCAST, VIDEO, None)[i % 3], duration_ms=1000 * i, user=i % 7)
        for i in range(1, 60)
    ),
    plain_event(60, 10, event_type="skip"),
    RawRecord(value=b"{not json", source=plain_event(61, 0).source),
    plain_event(62, 119.999, content=VIDEO, duration_ms=None, user=None),
]


class Collected:
    """What a pipeline step saw, kept in this process (the FnApiRunner runs bundles in the test's process)."""

    _lock = threading.Lock()
    seen: dict[str, list] = defaultdict(list)

    @classmethod
    def into(cls, name: str) -> beam.Map:
        def keep(value):
            with cls._lock:
                cls.seen[name].append(value)
            return value

        return beam.Map(keep)


def _event_view(enriched: EnrichedEvent) -> str:
    return enriched.model_dump_json()


def _aggregate_view(aggregate: WindowAggregate) -> str:
    return aggregate.model_dump_json(exclude={"emitted_at", "pane_timing", "pane_index", "oldest_commit_ms"})


def _dead_letter_view(dead_letter: DeadLetter) -> tuple:
    return (dead_letter.stage, dead_letter.reason, dead_letter.source.describe(), dead_letter.event_id)


def _run_core(settings: CoreSettings, name: str, list_size: int | None = None) -> None:
    with test_pipeline.TestPipeline() as pipeline:
        content = pipeline | "Content" >> beam.Create([snapshot(PODCAST, VIDEO)])
        if list_size is None:
            raw = pipeline | "Records" >> beam.Create(RECORDS)
        else:
            lists = [RECORDS[i : i + list_size] for i in range(0, len(RECORDS), list_size)]
            raw = pipeline | "Records" >> beam.Create(lists)
        outputs = build_core(raw, content, settings)
        enriched = outputs.enriched
        if settings.event_lists:
            enriched = enriched | "Items" >> beam.FlatMap(items)
        for part, collection, view in (
            ("events", enriched, _event_view),
            ("aggs", outputs.aggregates, _aggregate_view),
            ("dl", outputs.dead_letters, _dead_letter_view),
        ):
            _ = collection | f"View {part}" >> beam.Map(view) | f"Keep {part}" >> Collected.into(f"{name}/{part}")


@pytest.mark.parametrize("list_size", [1, 7, 1_000])
def test_lists_of_records_give_what_single_records_give(list_size: int):
    Collected.seen.clear()
    _run_core(PER_EVENT, "single")
    _run_core(IN_LISTS, "lists", list_size)
    seen = Collected.seen
    assert len(seen["single/events"]) == 60  # 62 records: one bad event type, one unreadable
    for part in ("events", "aggs", "dl"):
        assert sorted(seen[f"lists/{part}"]) == sorted(seen[f"single/{part}"]), part
    assert len(seen["single/dl"]) == 2


def test_a_source_lists_only_unique_ids_and_streaming_sums_only_lists():
    with pytest.raises(ValueError, match="ids_unique_at_source"):
        CoreSettings(streaming=False, event_lists=True)
    with pytest.raises(ValueError, match="event_lists must be set"):
        AggregateWindows(WindowSettings(), streaming=True, event_lists=False)


def _event_at(event_ts: datetime) -> EngagementEvent:
    return EngagementEvent(id=1, content_id=PODCAST.id, event_type="play", event_ts=event_ts, duration_ms=1000)


@pytest.mark.parametrize(
    "event_ts",
    [
        datetime(2026, 11, 22, 10, 0, tzinfo=UTC),  # on a boundary
        datetime(2026, 11, 22, 10, 0, 59, 999_999, tzinfo=UTC),  # the window's last microsecond
        datetime(1969, 12, 31, 23, 59, 30, tzinfo=UTC),  # before the epoch: floor, not truncation
        datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC) + timedelta(hours=5),
    ],
)
def test_the_window_of_an_event_in_a_list_is_the_one_fixed_windows_assigns(event_ts: datetime):
    enriched = enrich(_event_at(event_ts), PODCAST)
    sums = SumListsPerWindowFn(60)
    sums.start_bundle()
    sums.process([enriched])
    [windowed] = list(sums.finish_bundle())
    ((_, start), totals) = windowed.value
    micros = Timestamp.from_utc_datetime(event_ts).micros
    [window] = FixedWindows(60).assign(
        type("Context", (), {"timestamp": Timestamp(micros=micros), "element": None, "window": None})()
    )
    assert start == window.start.micros
    assert totals.event_count == 1


class _TaggingFn(beam.DoFn):
    def process(self, number: int, offset: int) -> Iterator:
        if number < 0:
            yield beam.pvalue.TaggedOutput("negative", number)
        elif number % 2:
            yield TimestampedValue(number + offset, 0)
        else:
            yield number + offset


def test_for_each_in_list_keeps_main_outputs_in_lists_and_tags_one_by_one():
    with test_pipeline.TestPipeline() as pipeline:
        offset = pipeline | "Offset" >> beam.Create([100])
        outputs = (
            pipeline
            | beam.Create([[1, 2, -3], [-4], [], [5]])
            | beam.ParDo(ForEachInList(_TaggingFn()), beam.pvalue.AsSingleton(offset)).with_outputs(
                "negative", main="kept"
            )
        )
        assert_that(outputs.kept | "Sorted" >> beam.Map(sorted), equal_to([[101, 102], [105]]), label="Lists")
        assert_that(outputs.negative, equal_to([-3, -4]), label="Tagged")


def test_a_list_of_rows_goes_to_each_of_its_shards_in_order():
    assert list(lists_per_key([(1, b"a"), (0, b"b"), (1, b"c")])) == [(1, [b"a", b"c"]), (0, [b"b"])]
    assert list(lists_per_key([])) == []
