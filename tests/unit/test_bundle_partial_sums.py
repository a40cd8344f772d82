"""A bundle's events leave the partial-sum step as one total per key and window, which add up to the same."""

from __future__ import annotations

from dataclasses import asdict

from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.timestamp import Timestamp

from tests.unit.helpers import PODCAST, VIDEO, at, plain_event
from transforms.aggregate import (
    EngagementTotals,
    EngagementTotalsFn,
    MergeTotalsFn,
    SumWithinBundleFn,
    aggregate_key,
)
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.model import Content, EnrichedEvent

FIRST = IntervalWindow(Timestamp(at(0)), Timestamp(at(60)))
SECOND = IntervalWindow(Timestamp(at(60)), Timestamp(at(120)))


def enriched(event_id: int, second: float, content: Content = PODCAST, user: int = 1) -> EnrichedEvent:
    event = decode_record(plain_event(event_id, second, content=content, user=user).value).event
    assert event is not None
    return enrich(event, content)


def bundle(fn: SumWithinBundleFn, events: list[tuple[EnrichedEvent, IntervalWindow]]) -> list:
    fn.start_bundle()
    for event, window in events:
        assert list(fn.process((aggregate_key(event), event), window) or []) == []
    return list(fn.finish_bundle())


def test_a_bundle_leaves_one_partial_per_key_and_window_stamped_inside_its_window():
    events = [
        (enriched(1, 5), FIRST),
        (enriched(2, 30, user=2), FIRST),
        (enriched(3, 59, content=VIDEO), FIRST),
        (enriched(4, 61), SECOND),
    ]

    partials = bundle(SumWithinBundleFn(), events)

    summary = sorted(
        (value.windows[0].start.micros, value.value[0], value.value[1].event_count, len(value.value[1].users))
        for value in partials
    )
    assert summary == [
        (FIRST.start.micros, aggregate_key(events[0][0]), 2, 2),
        (FIRST.start.micros, aggregate_key(events[2][0]), 1, 1),
        (SECOND.start.micros, aggregate_key(events[3][0]), 1, 1),
    ]
    for value in partials:
        assert value.timestamp == value.windows[0].max_timestamp()


def test_partials_of_several_bundles_merge_to_the_totals_of_the_events_themselves():
    events = [enriched(i, i % 50, content=PODCAST if i % 3 else VIDEO, user=i % 7) for i in range(1, 41)]
    fn = SumWithinBundleFn()
    partials = bundle(fn, [(e, FIRST) for e in events[:15]]) + bundle(fn, [(e, FIRST) for e in events[15:]])

    merge = MergeTotalsFn()
    by_key: dict = {}
    for value in partials:
        key, partial = value.value
        by_key[key] = merge.add_input(by_key.get(key) or merge.create_accumulator(), partial)

    direct = EngagementTotalsFn()
    expected: dict = {}
    for event in events:
        key = aggregate_key(event)
        expected[key] = direct.add_input(expected.get(key) or direct.create_accumulator(), event)
    assert {key: asdict(totals) for key, totals in by_key.items()} == {
        key: asdict(totals) for key, totals in expected.items()
    }
    assert sum(totals.event_count for totals in by_key.values()) == 40


def test_nothing_is_carried_from_one_bundle_into_the_next():
    fn = SumWithinBundleFn()
    bundle(fn, [(enriched(1, 5), FIRST)])

    second = bundle(fn, [(enriched(2, 6), FIRST)])

    assert [value.value[1].event_count for value in second] == [1]
    assert isinstance(second[0].value[1], EngagementTotals)
