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
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow, GlobalWindows
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.model import EngagementEvent


def forget_at(event_time: Timestamp, horizon: Duration) -> Timestamp:
    """When the id of an event with ``event_time`` may be forgotten: the watermark time of its expiry timer.

    Capped at the end of the global window, where the state is released anyway and past which a timer
    cannot be set (an event stamped in the far future would otherwise overflow it).
    """
    end_of_global_window = GlobalWindow().max_timestamp()
    if event_time >= end_of_global_window - horizon:
        return end_of_global_window
    return event_time + horizon


class DeduplicateByIdFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    # Event time, not processing time: see the module docstring for the watermark hold this avoids.
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, horizon_seconds: float | None) -> None:
        self._horizon = Duration.of(horizon_seconds) if horizon_seconds is not None else None
        self._passed = Metrics.counter("dedup", "unique_events")
        self._duplicates = Metrics.counter("dedup", "duplicates_dropped")

    def process(
        self,
        keyed: tuple[int, EngagementEvent],
        event_time: Timestamp = beam.DoFn.TimestampParam,
        seen: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN),
        expiry: beam.transforms.userstate.RuntimeTimer = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[EngagementEvent]:
        if seen.read():
            self._duplicates.inc()
            return
        seen.write(True)
        if self._horizon is not None:
            expiry.set(forget_at(event_time, self._horizon))
        self._passed.inc()
        yield keyed[1]

    @on_timer(EXPIRY)
    def expire(self, seen: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN)) -> None:
        seen.clear()


class DeduplicateEvents(beam.PTransform):
    """Drops repeated event ids until the watermark is ``horizon_seconds`` past the first copy's event time.

    In batch (``streaming=False``) ids are remembered for the whole run instead: the input is finite and its
    state is released when the run ends, so one timer per id would be work for nothing.
    """

    def __init__(self, horizon_seconds: float, streaming: bool = True) -> None:
        super().__init__()
        if horizon_seconds <= 0:
            raise ValueError("the de-duplication horizon must be positive")
        self._horizon_seconds = horizon_seconds if streaming else None

    def expand(self, events: beam.PCollection[EngagementEvent]) -> beam.PCollection[EngagementEvent]:
        return (
            events
            # State is per key and window; one global window makes "the same id" mean the same
            # whatever its event time, so a duplicate with a different event_ts is still caught.
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "KeyByEventId" >> beam.Map(lambda event: (event.id, event)).with_output_types(tuple[int, EngagementEvent])
            | "FirstCopyWins" >> beam.ParDo(DeduplicateByIdFn(self._horizon_seconds))
        )
