"""De-duplication by event id (SPEC §4), stateful, over a configurable horizon.

Kafka redelivers after connector restarts, producer retries and pipeline restarts. The first copy of an
id passes; later copies are dropped and counted until the watermark passes the first copy's event time
plus the horizon. Then the state is cleared, and the sinks' own idempotence takes over.

The horizon is measured in event time, against the same watermark that closes the windows downstream:
with a horizon of at least a window plus its allowed lateness, an id is remembered for as long as its
window can still change, so no copy is ever counted twice in an aggregate.

It is not processing time, although redelivery is a matter of delivery, because of what a
processing-time timer costs. The Python SDK gives such a timer a watermark hold at the timestamp of the
element that set it (``OutputTimer.set``: ``hold_timestamp=self._input_timestamp``), and runners that
honour holds (Prism, Dataflow) keep this stage's output watermark at the oldest pending event for the
whole horizon. Every window downstream then waits the horizon out (ten minutes by default) before its
on-time pane, and on Prism nothing reached a sink at all (docs/local-streaming.md, "De-duplication held
the watermark"). An event-time timer's hold is its own firing time, which is never behind the window
it protects.

State is kept per *block* of ``BLOCK_IDS`` ids, as a bitmap, rather than per id. Ids come from a PostgreSQL
sequence, so the events of a block arrive close together and mostly in the same bundles: one state read, one
write and one expiry timer then serve a whole run of ids instead of each event. A block holds ids that are
``DEDUP_LANES`` apart (``id % DEDUP_LANES`` is its lane), not consecutive ones: a runner processes a key on one
worker at a time, and with blocks of consecutive ids all the traffic of any moment would go to one or two
keys, which caps the step at one worker on Dataflow whatever the worker count. With lanes, the newest ids
spread over ``DEDUP_LANES`` keys, and the state is the same size (each bitmap still covers ``BLOCK_IDS`` ids). Runners
without a state cache (Prism) make every state read a round trip; per id, the de-dup alone was among the
job's largest costs (docs/benchmarks.md). A block is forgotten once the watermark passes the
newest first copy's event time plus the horizon, rounded up to ``EXPIRY_GRID_SECONDS`` so that a run of
events resets the timer once, not per event. Every id is therefore remembered for at least the horizon,
and at most for the block's spread of event times plus a grid step longer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, TimestampCombiner
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.model import EngagementEvent
from transforms.state_cache import prepare_worker_state

BLOCK_IDS = 128
"""Ids per de-dup state cell: a 16-byte bitmap."""

DEDUP_LANES = 16
"""Consecutive ids go to this many different blocks (keys), so the newest ids are spread over as many keys."""

EXPIRY_GRID_SECONDS = 10
"""Expiry times are rounded up to this grid, so a run of events in a block sets its timer once."""

_DEADLINE_BYTES = 8


def forget_at(event_time: Timestamp, horizon: Duration) -> Timestamp:
    """When an id first seen at ``event_time`` may be forgotten: ``event_time + horizon``, rounded up to the
    expiry grid, as the watermark time of its block's expiry timer.

    Capped at the end of the global window, where the state is released anyway and past which a timer
    cannot be set (an event stamped in the far future would otherwise overflow it).
    """
    end_of_global_window = GlobalWindow().max_timestamp()
    grid = Duration.of(EXPIRY_GRID_SECONDS).micros
    if event_time >= end_of_global_window - horizon - Duration(micros=grid):
        return end_of_global_window
    due = (event_time + horizon).micros
    return Timestamp(micros=-(-due // grid) * grid)


def id_block(event_id: int) -> tuple[int, int]:
    """(block, position in the block) of an event id; negative ids too (floor division).

    Ids ``DEDUP_LANES`` apart share a block; consecutive ids fall into ``DEDUP_LANES`` different blocks. The
    mapping is one to one: ``event_id = ((block // LANES) * BLOCK_IDS + position) * LANES + block % LANES``.
    """
    lane = event_id % DEDUP_LANES
    group, position = divmod(event_id // DEDUP_LANES, BLOCK_IDS)
    return group * DEDUP_LANES + lane, position


@dataclass(frozen=True)
class SeenIds:
    """A block's state: which of its ids were seen, and when the block may be forgotten (µs, watermark)."""

    bitmap: int = 0
    forget_at_micros: int | None = None

    def has(self, position: int) -> bool:
        return bool(self.bitmap >> position & 1)

    def add(self, position: int, forget: Timestamp) -> SeenIds:
        later = forget.micros if self.forget_at_micros is None else max(self.forget_at_micros, forget.micros)
        return SeenIds(self.bitmap | 1 << position, later)

    def encode(self) -> bytes:
        deadline = (self.forget_at_micros or 0).to_bytes(_DEADLINE_BYTES, "big", signed=True)
        return deadline + self.bitmap.to_bytes(BLOCK_IDS // 8, "big")

    @classmethod
    def decode(cls, data: bytes | None) -> SeenIds:
        if not data:
            return cls()
        deadline = int.from_bytes(data[:_DEADLINE_BYTES], "big", signed=True)
        return cls(int.from_bytes(data[_DEADLINE_BYTES:], "big"), deadline)


class DeduplicateByIdFn(beam.DoFn):
    """Input keyed by id block (``id_block``); lets the first copy of each id through."""

    SEEN = ReadModifyWriteStateSpec("seen", BytesCoder())
    # Event time, not processing time: see the module docstring for the watermark hold this avoids.
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, horizon_seconds: float) -> None:
        self._horizon = Duration.of(horizon_seconds)
        self._passed = Metrics.counter("dedup", "unique_events")
        self._duplicates = Metrics.counter("dedup", "duplicates_dropped")

    def setup(self) -> None:
        prepare_worker_state()

    def process(
        self,
        keyed: tuple[int, EngagementEvent],
        event_time: Timestamp = beam.DoFn.TimestampParam,
        seen_state: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN),
        expiry: beam.transforms.userstate.RuntimeTimer = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[EngagementEvent]:
        event = keyed[1]
        _, position = id_block(event.id)
        seen = SeenIds.decode(seen_state.read())
        if seen.has(position):
            self._duplicates.inc()
            return
        updated = seen.add(position, forget_at(event_time, self._horizon))
        seen_state.write(updated.encode())
        if updated.forget_at_micros != seen.forget_at_micros:
            expiry.set(Timestamp(micros=updated.forget_at_micros))
        self._passed.inc()
        yield event

    @on_timer(EXPIRY)
    def expire(
        self, seen_state: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN)
    ) -> None:
        seen_state.clear()


class KeepOneCopyFn(beam.DoFn):
    """Batch de-duplication: one copy of each grouped id, back at its own event time."""

    def __init__(self) -> None:
        self._passed = Metrics.counter("dedup", "unique_events")
        self._duplicates = Metrics.counter("dedup", "duplicates_dropped")

    def process(self, grouped: tuple[int, Iterable[EngagementEvent]]) -> Iterator[EngagementEvent]:
        copies = list(grouped[1])
        self._duplicates.inc(len(copies) - 1)
        self._passed.inc()
        # The group is stamped with its earliest copy's event time (see GroupCopies); keep that copy.
        yield min(copies, key=lambda event: event.event_ts)


class DeduplicateEvents(beam.PTransform):
    """Drops repeated event ids until the watermark is ``horizon_seconds`` past the first copy's event time.

    In batch (``streaming=False``) ids are grouped instead: the input is finite, so a GroupByKey sees every
    copy of an id at once, and runs far faster than a state read and write per element (on Prism, per-id
    state round trips made it the backfill's limit: docs/benchmarks.md).
    """

    def __init__(self, horizon_seconds: float, streaming: bool = True) -> None:
        super().__init__()
        if horizon_seconds <= 0:
            raise ValueError("the de-duplication horizon must be positive")
        self._horizon_seconds = horizon_seconds
        self._streaming = streaming

    def expand(self, events: beam.PCollection[EngagementEvent]) -> beam.PCollection[EngagementEvent]:
        in_global_window = (
            events
            # State and groups are per key and window; one global window makes "the same id" mean the same
            # whatever its event time, so a duplicate with a different event_ts is still caught.
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
        )
        if not self._streaming:
            return (
                in_global_window
                | "KeyByEventId"
                >> beam.Map(lambda event: (event.id, event)).with_output_types(tuple[int, EngagementEvent])
                # Stamping each group with its earliest copy keeps events at their event time for the windows
                # downstream; moving them back after the GroupByKey would make them late, and dropped.
                | "StampGroupsEarliest"
                >> beam.WindowInto(GlobalWindows(), timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST)
                | "GroupCopies" >> beam.GroupByKey()
                | "KeepOneCopy" >> beam.ParDo(KeepOneCopyFn())
            )
        return (
            in_global_window
            | "KeyByIdBlock"
            >> beam.Map(lambda event: (id_block(event.id)[0], event)).with_output_types(tuple[int, EngagementEvent])
            | "FirstCopyWins" >> beam.ParDo(DeduplicateByIdFn(self._horizon_seconds))
        )
