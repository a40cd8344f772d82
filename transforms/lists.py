"""Lists of elements through per-element steps: a way past Beam's cost per element.

Each step of a Python pipeline costs the runner a few microseconds per element before the step's own work:
a windowed value, a call through the DoFn invoker, the receivers of the fused stage, a counter update
(docs/benchmarks.md, backfill session 18: the SDK's own machinery was a third of a backfill's CPU, and most of
the streaming worker's, streaming session 20). Two places make lists of events, and every step after them
takes lists: the backfill's reader, one list per ``LIST_ROWS`` rows of its cursor, and the streaming job's
de-duplication, one list per id block of a bundle (``transforms.dedup``).

``ForEachInList`` runs an ordinary per-element DoFn over each item of a list, so the rules stay written once,
in the DoFns that also run one element at a time (decoding, before the streaming job's lists are made). Its main
output is the list of what the DoFn emitted for the items; what the DoFn emits on a tag (dead letters) goes out
as single elements, as before.

The items of a list lose their own timestamps (the list has one, its earliest item's in streaming), so a list
must not reach a step that windows by event time: ``transforms.aggregate`` computes each event's window from its
``event_ts`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import TimestampedValue

LIST_ROWS = 50
"""Items per list where a pipeline cuts lists itself (the backfill's reader, re-listing after a join). Enough that
the cost per list vanishes; few enough that a list's objects die young: with 1,000 events per list, every
collection of the garbage collector's youngest generation found a list's events alive and promoted them, and
the full collections that followed took a quarter of a backfill's CPU (docs/benchmarks.md, backfill session 19).
At 50, the collector took 0.6 s of a chunk job's 24 CPU seconds."""


class ForEachInList(beam.DoFn):
    """Applies ``dofn`` to every item of each input list; emits one list of its main outputs per input list
    (none when that is empty) and its tagged outputs one by one.

    ``dofn`` may use ``setup``, ``start_bundle``, ``finish_bundle`` (without outputs) and ``teardown``, and
    take side inputs after the element; it may not ask for the element's timestamp, window or pane, which an
    item of a list does not have. A ``TimestampedValue`` it emits loses its timestamp.
    """

    def __init__(self, dofn: beam.DoFn) -> None:
        super().__init__()
        self._dofn = dofn

    def default_label(self) -> str:
        return f"ForEachInList({self._dofn.default_label()})"

    def setup(self) -> None:
        self._dofn.setup()

    def start_bundle(self) -> None:
        self._dofn.start_bundle()

    # No hint on *side_inputs: Beam type-checks such a hint against the side inputs' tuple and refuses Any.
    def process(self, items: Iterable[Any], *side_inputs) -> Iterator[Any]:  # noqa: ANN002
        kept: list[Any] = []
        process = self._dofn.process
        for item in items:
            for output in process(item, *side_inputs) or ():
                if isinstance(output, beam.pvalue.TaggedOutput):
                    yield output
                elif isinstance(output, TimestampedValue):
                    kept.append(output.value)
                else:
                    kept.append(output)
        if kept:
            yield kept

    def finish_bundle(self) -> None:
        if self._dofn.finish_bundle() is not None:
            raise TypeError(f"{self._dofn.default_label()}.finish_bundle emits: it cannot run over lists")

    def teardown(self) -> None:
        self._dofn.teardown()


def per_item(dofn: beam.DoFn, lists: bool) -> beam.DoFn:
    """``dofn`` over lists of its elements when ``lists``, else ``dofn`` itself: one switch for every step that
    runs either way."""
    return ForEachInList(dofn) if lists else dofn


def items(lists: Iterable[Any]) -> Iterator[Any]:
    """The items of a list, one element each: where a list meets a step that takes single elements."""
    yield from lists


def lists_per_key(pairs: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, list[Any]]]:
    """A list of (key, value) as one (key, values) per key it holds, each in the list's order: how a list
    crosses into a step keyed by something its items differ in (a sink's shard or stream)."""
    per_key: dict[Any, list[Any]] = {}
    for key, value in pairs:
        per_key.setdefault(key, []).append(value)
    yield from per_key.items()
