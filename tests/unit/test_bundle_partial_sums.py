"""A bundle's lists of events leave streaming's partial-sum step as one total per key and window, stamped so that
``FixedWindows`` puts each in its events' window, and the totals add up to the events' own."""

from __future__ import annotations

import pickle
from dataclasses import asdict

from apache_beam.transforms.window import FixedWindows, GlobalWindow, IntervalWindow, WindowFn
from apache_beam.utils.timestamp import Timestamp

from tests.unit.helpers import PODCAST, VIDEO, at, plain_event
from transforms.aggregate import (
    EngagementTotals,
    EngagementTotalsFn,
    MergeTotalsFn,
    SumListsWithinBundleFn,
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


def bundle(fn: SumListsWithinBundleFn, events: list[EnrichedEvent], list_size: int = 2) -> list:
    fn.start_bundle()
    for start in range(0, len(events), list_size):
        assert list(fn.process(events[start : start + list_size]) or []) == []
    return list(fn.finish_bundle())


def window_of(timestamp: Timestamp) -> IntervalWindow:
    return FixedWindows(60).assign(WindowFn.AssignContext(timestamp))[0]


def test_a_bundle_leaves_one_partial_per_key_and_window_stamped_inside_its_window():
    events = [enriched(1, 5), enriched(2, 30, user=2), enriched(3, 59, content=VIDEO), enriched(4, 61)]

    partials = bundle(SumListsWithinBundleFn(60), events)

    summary = sorted(
        (window_of(value.timestamp).start.micros, value.value[0], value.value[1].event_count, len(value.value[1].users))
        for value in partials
    )
    assert summary == [
        (FIRST.start.micros, aggregate_key(events[0]), 2, 2),
        (FIRST.start.micros, aggregate_key(events[2]), 1, 1),
        (SECOND.start.micros, aggregate_key(events[3]), 1, 1),
    ]
    for value in partials:
        # Still in the global window: FixedWindows is assigned after the sums, by this timestamp.
        assert value.windows == [GlobalWindow()]
        assert value.timestamp == window_of(value.timestamp).max_timestamp()


def test_partials_of_several_bundles_merge_to_the_totals_of_the_events_themselves():
    events = [enriched(i, i % 50, content=PODCAST if i % 3 else VIDEO, user=i % 7) for i in range(1, 41)]
    fn = SumListsWithinBundleFn(60)
    partials = bundle(fn, events[:15], list_size=4) + bundle(fn, events[15:], list_size=7)

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
    fn = SumListsWithinBundleFn(60)
    bundle(fn, [enriched(1, 5)])

    second = bundle(fn, [enriched(2, 6)])

    assert [value.value[1].event_count for value in second] == [1]
    assert isinstance(second[0].value[1], EngagementTotals)


def test_distinct_users_are_kept_as_their_16_bytes_so_the_window_state_pickles_small():
    # Every pane writes its window's totals, users included, back to state: as text the ids were 39 bytes
    # each in the pickle, as their UUID bytes 19.
    fn = EngagementTotalsFn()
    totals = fn.create_accumulator()
    for user in range(1, 1_001):
        fn.add_input(totals, enriched(user, 5, user=user))
    fn.add_input(totals, enriched(1_001, 6, user=1))  # a user seen before counts once

    assert len(totals.users) == 1_000
    assert all(isinstance(user, bytes) and len(user) == 16 for user in totals.users)
    assert len(pickle.dumps(totals, protocol=pickle.HIGHEST_PROTOCOL)) < 21_000
