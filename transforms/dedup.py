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
from apache_beam.utils.windowed_value import WindowedValue

from transforms.instants import epoch_micros
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

    def first_copies(
        self, events: Iterable[EngagementEvent], horizon: Duration
    ) -> tuple[SeenIds, list[EngagementEvent]]:
        """The block after ``events`` (of this block), and those of them whose id it had not seen, in order.

        The block is kept for the newest first copy's event time plus the horizon (``forget_at``), each id's
        own time, not the time its list is stamped with. forget_at grows with the event time, so it is computed
        once, for the latest.
        """
        bitmap = self.bitmap
        unique: list[EngagementEvent] = []
        latest_micros = None
        for event in events:
            position = id_block(event.id)[1]
            if bitmap >> position & 1:
                continue
            bitmap |= 1 << position
            unique.append(event)
            micros = epoch_micros(event.event_ts)
            if latest_micros is None or micros > latest_micros:
                latest_micros = micros
        if latest_micros is None:
            return self, unique
        forget = forget_at(Timestamp(micros=latest_micros), horizon).micros
        if self.forget_at_micros is not None:
            forget = max(forget, self.forget_at_micros)
        return SeenIds(bitmap, forget), unique

    def encode(self) -> bytes:
        deadline = (self.forget_at_micros or 0).to_bytes(_DEADLINE_BYTES, "big", signed=True)
        return deadline + self.bitmap.to_bytes(BLOCK_IDS // 8, "big")

    @classmethod
    def decode(cls, data: bytes | None) -> SeenIds:
        if not data:
            return cls()
        deadline = int.from_bytes(data[:_DEADLINE_BYTES], "big", signed=True)
        return cls(int.from_bytes(data[_DEADLINE_BYTES:], "big"), deadline)


class ListsPerIdBlockFn(beam.DoFn):
    """EngagementEvent -> (id block, events): one list per block of a bundle's events, in arrival order.

    The list is stamped with its earliest event's time. Downstream, that keeps a list that is still on its way
    holding back the watermark no later than any of its events would have on their own (the windows are
    computed from each event's ``event_ts``: ``transforms.aggregate``).
    """

    def start_bundle(self) -> None:
        self._lists: dict[int, list[EngagementEvent]] = {}
        self._earliest_micros: dict[int, int] = {}

    # The event time is read from the event (decoding stamps each event with it), not asked of the runner: a
    # DoFn that takes TimestampParam goes through Beam's slower per-window invoker.
    def process(self, event: EngagementEvent) -> None:
        block = id_block(event.id)[0]
        micros = epoch_micros(event.event_ts)
        events = self._lists.get(block)
        if events is None:
            self._lists[block] = [event]
            self._earliest_micros[block] = micros
            return
        events.append(event)
        if micros < self._earliest_micros[block]:
            self._earliest_micros[block] = micros

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for block, events in self._lists.items():
            yield WindowedValue((block, events), Timestamp(micros=self._earliest_micros[block]), [GlobalWindow()])
        self._lists, self._earliest_micros = {}, {}


class DeduplicateByIdFn(beam.DoFn):
    """Input: lists of events keyed by id block (``ListsPerIdBlockFn``); outputs the list of each id's first
    copy (nothing when every event was a copy). One state read and write per list, not per event."""

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
        keyed: tuple[int, list[EngagementEvent]],
        seen_state: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN),
        expiry: beam.transforms.userstate.RuntimeTimer = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[list[EngagementEvent]]:
        events = keyed[1]
        before = SeenIds.decode(seen_state.read())
        seen, unique = before.first_copies(events, self._horizon)
        self._duplicates.inc(len(events) - len(unique))
        if not unique:
            return
        seen_state.write(seen.encode())
        if seen.forget_at_micros != before.forget_at_micros:
            expiry.set(Timestamp(micros=seen.forget_at_micros))
        self._passed.inc(len(unique))
        yield unique

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

    In streaming the output holds lists of events, one per id block of each bundle (``ListsPerIdBlockFn``): the
    steps after this one run per list (``transforms/lists.py``), since per event, Beam's own machinery was most
    of the job's CPU (docs/benchmarks.md, streaming session 20).

    In batch (``streaming=False``) ids are grouped instead: the input is finite, so a GroupByKey sees every copy
    of an id at once, and runs far faster than a state read and write per element (on Prism, per-id state round
    trips made it the backfill's limit: docs/benchmarks.md). The output is then single events.
    """

    def __init__(self, horizon_seconds: float, streaming: bool = True) -> None:
        super().__init__()
        if horizon_seconds <= 0:
            raise ValueError("the de-duplication horizon must be positive")
        self._horizon_seconds = horizon_seconds
        self._streaming = streaming

    def expand(self, events: beam.PCollection[EngagementEvent]) -> beam.PCollection[EngagementEvent]:
        # State and groups are per key and window; one global window makes "the same id" mean the same whatever
        # its event time, so a duplicate with a different event_ts is still caught. A stream read from Kafka is
        # in it already, and the step would cost a window object per event.
        in_global_window = events
        if not events.windowing.is_default():
            in_global_window = events | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
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
            | "ListsPerIdBlock" >> beam.ParDo(ListsPerIdBlockFn()).with_output_types(tuple[int, list[EngagementEvent]])
            | "FirstCopyWins"
            >> beam.ParDo(DeduplicateByIdFn(self._horizon_seconds)).with_output_types(list[EngagementEvent])
        )
