"""Batching across bundles (transforms/batching.py): the pure parts; the sinks' integration tests run it."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms.batching import BatchAcrossBundles, BatchWithinBundleFn, next_whole_second, rebatched


def test_values_are_listed_per_key_and_the_rest_leaves_when_the_bundle_ends() -> None:
    batcher = BatchWithinBundleFn(batch_size=2)
    batcher.start_bundle()
    emitted = []
    for shard, row, at in [(0, b"a", 10), (1, b"b", 11), (0, b"c", 12), (1, b"d", 9), (0, b"e", 13), (1, b"f", 8)]:
        emitted += list(batcher.process((shard, row), Timestamp(at)))
    assert emitted == [(0, [b"a", b"c"]), (1, [b"b", b"d"])]
    (rest_0, rest_1) = sorted(batcher.finish_bundle(), key=lambda value: value.value[0])
    assert (rest_0.value, rest_0.timestamp, rest_0.windows) == ((0, [b"e"]), Timestamp(13), [GlobalWindow()])
    # The latest timestamp of the rows left, not of the shard's earlier batch.
    assert (rest_1.value, rest_1.timestamp) == ((1, [b"f"]), Timestamp(8))
    # Nothing carries over into the next bundle.
    batcher.start_bundle()
    assert list(batcher.finish_bundle()) == []


def test_lists_of_values_join_their_keys_list_in_order_and_are_cut_at_the_batch_size() -> None:
    batcher = BatchWithinBundleFn(batch_size=3, value_lists=True)
    batcher.start_bundle()
    emitted = []
    for shard, rows, at in [(0, [b"a", b"b"], 10), (1, [b"x"], 11), (0, [b"c", b"d", b"e", b"f"], 12), (0, [], 14)]:
        emitted += list(batcher.process((shard, rows), Timestamp(at)))
    # A list may fill a batch and start the next.
    assert emitted == [(0, [b"a", b"b", b"c"]), (0, [b"d", b"e", b"f"])]
    (rest,) = batcher.finish_bundle()
    assert (rest.value, rest.timestamp) == ((1, [b"x"]), Timestamp(11))


def test_a_within_bundle_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        BatchWithinBundleFn(0)


def test_lists_are_cut_again_into_batches_of_at_most_the_batch_size_in_order() -> None:
    lists = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    assert list(rebatched("k", lists, 4)) == [("k", [1, 2, 3, 4]), ("k", [5, 6, 7, 8]), ("k", [9])]
    assert list(rebatched("k", [[1, 2], [3, 4]], 2)) == [("k", [1, 2]), ("k", [3, 4])]
    assert list(rebatched("k", [], 2)) == []


@pytest.mark.parametrize(("batch_size", "max_buffering_seconds"), [(0, 1.0), (5, 0.0), (5, -1.0)])
def test_batching_across_bundles_refuses_nonsense(batch_size: int, max_buffering_seconds: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        BatchAcrossBundles(batch_size, max_buffering_seconds)


def test_every_value_arrives_once_in_batches_of_at_most_the_batch_size() -> None:
    """A bounded run on the default (FnApiRunner) runner: the end of the input flushes what is left."""
    elements = [(key, value) for value in range(23) for key in (0, 1)]
    with beam.Pipeline() as pipeline:
        batches = pipeline | beam.Create(elements) | BatchAcrossBundles(4, None, value_type=int)
        sizes = batches | "Sizes" >> beam.MapTuple(lambda key, values: 0 < len(values) <= 4)
        values = batches | "Values" >> beam.FlatMapTuple(lambda key, values: [(key, value) for value in values])
        assert_that(sizes | beam.Distinct(), equal_to([True]), label="sizes")
        assert_that(values, equal_to(elements), label="values")


def test_buffering_timers_count_from_the_next_whole_second_so_that_all_keys_share_them(monkeypatch):
    for now, expected in ((1_700_000_000.001, 1_700_000_001.0), (1_700_000_000.999, 1_700_000_001.0)):
        monkeypatch.setattr("time.time", lambda now=now: now)
        assert next_whole_second() == expected
    monkeypatch.setattr("time.time", lambda: 1_700_000_002.0)
    assert next_whole_second() == 1_700_000_002.0
