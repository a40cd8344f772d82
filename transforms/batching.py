"""Batches per key that span bundles, at a cost per bundle rather than per element.

Beam's ``GroupIntoBatches`` takes every element through a shuffle, a bag-state append, a count update and a
timer write (it sets its end-of-window timer again for each element). On the streaming job's hot path that is
two sinks' worth of per-event work for the one Python worker (docs/benchmarks.md, session 8). Here each
bundle's elements are first cut into per-key lists without state (``BatchWithinBundleFn``), and only those
lists cross into ``GroupIntoBatches``, which then holds lists instead of elements; what leaves is cut again
into batches of at most ``batch_size`` elements. The lists cross as their pickle: the SDK's state cache weighs a
bag again on every append, walking each object it holds, so a bag of lists of values cost a walk over every
value held so far at each bundle (docs/benchmarks.md, session 12); a bag of bytes is weighed per list.

The guarantees are ``GroupIntoBatches``': a batch is at most ``batch_size`` elements, held at most
``max_buffering_seconds`` (plus up to a second, below) after its first list reached the grouping state (None:
until the window ends, for bounded runs), which is when the bundle that carried it ended; and a runner that
replays a bundle replays the same batches, since they are committed with the grouping stage's output.

Each key's buffering timer counts from the next whole second (``next_whole_second``), so the timers of all keys
fall on the same instants and a runner fires them in one bundle, not one bundle per key at its own millisecond
(docs/benchmarks.md, session 13).
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue


class BatchWithinBundleFn(beam.DoFn):
    """(key, value) -> (key, values): lists of at most ``batch_size`` values per key, from one bundle's elements.

    With ``value_lists``, each input carries a list of values, (key, values), whose values join the key's list in
    their order. The values left when the bundle ends go out as a last, smaller list per key, stamped with their
    latest timestamp, in the global window: the input must be in the global window too.
    """

    def __init__(self, batch_size: int, value_lists: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, not {batch_size}")
        self._batch_size = batch_size
        self._value_lists = value_lists
        self._pending: dict[Any, list[Any]] = {}
        self._latest: dict[Any, Timestamp] = {}

    def start_bundle(self) -> None:
        self._pending, self._latest = {}, {}

    def process(
        self, element: tuple[Any, Any], timestamp: Timestamp = beam.DoFn.TimestampParam
    ) -> Iterator[tuple[Any, list[Any]]]:
        key, value = element
        self._latest[key] = max(timestamp, self._latest.get(key, timestamp))
        for one in value if self._value_lists else (value,):
            values = self._pending.setdefault(key, [])
            values.append(one)
            if len(values) == self._batch_size:
                del self._pending[key]
                yield key, values
        if key not in self._pending:
            del self._latest[key]

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for key, values in self._pending.items():
            yield WindowedValue((key, values), self._latest[key], [GlobalWindow()])
        self._pending, self._latest = {}, {}


def pickled_list(key: Any, values: list[Any]) -> tuple[Any, bytes]:
    return key, pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL)


def unpickled_lists(pickled: Iterable[bytes]) -> Iterator[list[Any]]:
    return (pickle.loads(values) for values in pickled)  # noqa: S301 - written by pickled_list in this transform


def rebatched(key: Any, lists: Iterable[list[Any]], batch_size: int) -> Iterator[tuple[Any, list[Any]]]:
    """The values of ``lists``, in order, as batches of at most ``batch_size``."""
    batch: list[Any] = []
    for values in lists:
        for value in values:
            batch.append(value)
            if len(batch) == batch_size:
                yield key, batch
                batch = []
    if batch:
        yield key, batch


def next_whole_second() -> float:
    """``GroupIntoBatches``' clock for its buffering timers: now, rounded up to a whole second."""
    return float(math.ceil(time.time()))


class BatchAcrossBundles(beam.PTransform):
    """(key, value) in the global window -> (key, list of at most ``batch_size`` values), across bundles.

    ``value_type`` names the values' type, so the lists get a real coder rather than pickling; keys must have a
    deterministic coder, as for any grouping.
    """

    def __init__(
        self,
        batch_size: int,
        max_buffering_seconds: float | None,
        key_type: Any = int,
        value_type: Any = Any,
        value_lists: bool = False,
    ) -> None:
        """``value_lists``: each input element carries a list of values, (key, values); see ``BatchWithinBundleFn``."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, not {batch_size}")
        if max_buffering_seconds is not None and max_buffering_seconds <= 0:
            # GroupIntoBatches reads 0 as "no limit": a quiet key would hold its values until the window ends.
            raise ValueError("max_buffering_seconds must be positive, or None to hold batches until the window ends")
        self._batch_size = batch_size
        self._max_buffering_seconds = max_buffering_seconds
        self._key_type = key_type
        self._value_type = value_type
        self._value_lists = value_lists

    def expand(self, elements: beam.PCollection[tuple[Any, Any]]) -> beam.PCollection[tuple[Any, list[Any]]]:
        batch_size = self._batch_size
        lists_type = tuple[self._key_type, list[self._value_type]]
        return (
            elements
            | "Lists within bundle"
            >> beam.ParDo(BatchWithinBundleFn(batch_size, self._value_lists)).with_output_types(lists_type)
            | "Pickle lists" >> beam.MapTuple(pickled_list).with_output_types(tuple[self._key_type, bytes])
            # Counted in lists, so a group may exceed batch_size values; it is cut again below.
            | "Group lists"
            >> beam.GroupIntoBatches(
                batch_size, max_buffering_duration_secs=self._max_buffering_seconds, clock=next_whole_second
            )
            | "Batches"
            >> beam.FlatMapTuple(
                lambda key, pickled: rebatched(key, unpickled_lists(pickled), batch_size)
            ).with_output_types(lists_type)
        )
