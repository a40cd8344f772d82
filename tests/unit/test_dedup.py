"""De-duplication by event id: the horizon runs in event time (see transforms/dedup.py for why)."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing import test_pipeline, test_stream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Duration, Timestamp

from tests.unit.helpers import at, plain_event
from transforms.decode import DecodeRecords, decode_record
from transforms.dedup import (
    BLOCK_IDS,
    DEDUP_LANES,
    EXPIRY_GRID_SECONDS,
    DeduplicateEvents,
    ListsPerIdBlockFn,
    SeenIds,
    forget_at,
    id_block,
)
from transforms.model import EngagementEvent

HORIZON = 600


def test_an_id_is_forgotten_a_horizon_after_its_event_time_rounded_up_to_the_expiry_grid():
    forget = forget_at(Timestamp.of(at(5)), Duration.of(HORIZON))
    assert Timestamp.of(at(5 + HORIZON)) <= forget < Timestamp.of(at(5 + HORIZON + EXPIRY_GRID_SECONDS))
    assert forget.micros % (EXPIRY_GRID_SECONDS * 1_000_000) == 0


def decoded_event(event_id: int, second: float) -> EngagementEvent:
    event = decode_record(plain_event(event_id, second).value).event
    assert event is not None
    return event


def same_block(n: int) -> int:
    """The n-th id of id 1's block."""
    return 1 + n * DEDUP_LANES


def test_each_id_has_its_own_place_in_one_block_negative_ones_too():
    ids = range(-5 * BLOCK_IDS * DEDUP_LANES, 5 * BLOCK_IDS * DEDUP_LANES)
    places = [id_block(event_id) for event_id in ids]
    assert len(set(places)) == len(places)
    assert all(0 <= position < BLOCK_IDS for _, position in places)
    assert id_block(0) == (0, 0)
    assert id_block(same_block(1)) == (id_block(1)[0], 1)
    assert id_block(-1) == (-1, BLOCK_IDS - 1)


def test_the_newest_ids_spread_over_many_keys():
    # A runner processes a key on one worker at a time: any run of consecutive ids, the traffic of a moment,
    # must not all go to one key.
    for start in (0, 12_345, 10**12):
        keys = [id_block(event_id)[0] for event_id in range(start, start + 1_000)]
        counts = [keys.count(key) for key in set(keys)]
        assert len(counts) >= DEDUP_LANES
        assert max(counts) <= 2 * len(keys) / DEDUP_LANES


def test_a_block_remembers_each_seen_id_and_its_latest_expiry_through_its_encoding():
    horizon = Duration.of(HORIZON)
    first, passed = SeenIds().first_copies(
        [decoded_event(1, 70), decoded_event(same_block(BLOCK_IDS - 1), 10), decoded_event(1, 70)], horizon
    )
    assert [e.id for e in passed] == [1, same_block(BLOCK_IDS - 1)]  # the second copy of 1 is dropped
    decoded = SeenIds.decode(first.encode())
    assert decoded == first
    assert decoded.has(0)
    assert decoded.has(BLOCK_IDS - 1)
    assert not decoded.has(1)
    # Kept for the newest first copy (70 s), not for the one that came last (10 s).
    assert decoded.forget_at_micros == forget_at(Timestamp.of(at(70)), horizon).micros
    # An older event later does not shorten the block's life; copies alone change nothing.
    second, passed = decoded.first_copies([decoded_event(same_block(1), 5)], horizon)
    assert [e.id for e in passed] == [same_block(1)]
    assert second.forget_at_micros == decoded.forget_at_micros
    assert decoded.first_copies([decoded_event(1, 500)], horizon) == (decoded, [])
    assert SeenIds.decode(None) == SeenIds()


def test_an_event_from_the_far_future_is_remembered_until_the_end_of_the_global_window():
    end = GlobalWindow().max_timestamp()
    assert forget_at(end - Duration.of(1), Duration.of(HORIZON)) == end
    assert forget_at(end, Duration.of(HORIZON)) == end


def unique_ids(stream: test_stream.TestStream) -> tuple[test_pipeline.TestPipeline, beam.PCollection]:
    options = PipelineOptions([])
    options.view_as(StandardOptions).streaming = True
    pipeline = test_pipeline.TestPipeline(options=options)
    ids = (
        (pipeline | stream | "Decode" >> DecodeRecords()).events
        | "Deduplicate" >> DeduplicateEvents(HORIZON)
        | "Ids" >> beam.FlatMap(lambda events: [event.id for event in events])
    )
    return pipeline, ids


def test_a_copy_within_the_horizon_is_dropped_however_much_processing_time_passes():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5)])
        # Far more processing time than the horizon, while the watermark stays inside it: a
        # processing-time horizon would have forgotten id 1 by now.
        .advance_processing_time(HORIZON * 3)
        .advance_watermark_to(at(5 + HORIZON - 1))
        .add_elements([plain_event(1, 5)])
        .advance_watermark_to_infinity()
    )
    pipeline, ids = unique_ids(stream)
    assert_that(ids, equal_to([1]))
    pipeline.run()


def test_a_copy_after_the_watermark_passes_the_horizon_is_let_through():
    other_block = 1 + BLOCK_IDS * DEDUP_LANES  # id 1's lane, the next block
    forgotten = forget_at(Timestamp.of(at(5)), Duration.of(HORIZON))
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5), plain_event(other_block, 400)])
        .advance_watermark_to(forgotten.micros / 1e6 + 1)  # id 1's horizon is over, the other's is not
        .add_elements([plain_event(1, 5), plain_event(other_block, 400)])
        .advance_watermark_to_infinity()
    )
    pipeline, ids = unique_ids(stream)
    # The second copy of 1 is the sinks' to absorb (SPEC §4: they are idempotent beyond the horizon).
    assert_that(ids, equal_to([1, 1, other_block]))
    pipeline.run()


def test_ids_of_one_block_are_remembered_until_its_newest_first_copy_expires():
    stream = (
        test_stream.TestStream()
        .advance_watermark_to(at(0))
        .add_elements([plain_event(1, 5), plain_event(same_block(1), 400), plain_event(same_block(1), 400)])
        .advance_watermark_to(at(5 + HORIZON + EXPIRY_GRID_SECONDS + 1))  # past id 1's own horizon
        .add_elements([plain_event(1, 5), plain_event(same_block(2), 5)])
        .advance_watermark_to_infinity()
    )
    pipeline, ids = unique_ids(stream)
    # The second id keeps the block, so the late copy of 1 is still dropped; a new id of the block passes.
    assert_that(ids, equal_to([1, same_block(1), same_block(2)]))
    pipeline.run()


def test_a_bundle_leaves_one_list_per_id_block_in_arrival_order_stamped_with_its_earliest_event():
    fn = ListsPerIdBlockFn()
    fn.start_bundle()
    arrivals = [(same_block(2), 30), (2, 10), (1, 20), (same_block(1), 5)]
    for event_id, second in arrivals:
        assert list(fn.process(decoded_event(event_id, second)) or []) == []
    lists = {value.value[0]: value for value in fn.finish_bundle()}

    assert sorted(lists) == sorted({id_block(1)[0], id_block(2)[0]})
    first_block = lists[id_block(1)[0]]
    assert [e.id for e in first_block.value[1]] == [same_block(2), 1, same_block(1)]
    assert first_block.timestamp == Timestamp.of(at(5))
    assert first_block.windows == [GlobalWindow()]
    assert lists[id_block(2)[0]].timestamp == Timestamp.of(at(10))
    fn.start_bundle()
    assert list(fn.finish_bundle()) == []
