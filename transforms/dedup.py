"""De-duplication by event id (SPEC §4), stateful, over a configurable horizon.

Kafka redelivers after connector restarts, producer retries and pipeline restarts. The first copy of an
id passes; later copies within the horizon are dropped and counted. The horizon is processing time
because redelivery is a property of delivery, not of when the event happened; once it lapses the state
is cleared, and the sinks' own idempotence takes over.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import BooleanCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.model import EngagementEvent


class DeduplicateByIdFn(beam.DoFn):
    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.REAL_TIME)

    def __init__(self, horizon_seconds: float | None) -> None:
        self._horizon = Duration.of(horizon_seconds) if horizon_seconds is not None else None
        self._passed = Metrics.counter("dedup", "unique_events")
        self._duplicates = Metrics.counter("dedup", "duplicates_dropped")

    def process(
        self,
        keyed: tuple[int, EngagementEvent],
        seen: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN),
        expiry: beam.transforms.userstate.RuntimeTimer = beam.DoFn.TimerParam(EXPIRY),
    ) -> Iterator[EngagementEvent]:
        if seen.read():
            self._duplicates.inc()
            return
        seen.write(True)
        if self._horizon is not None:
            expiry.set(Timestamp.now() + self._horizon)
        self._passed.inc()
        yield keyed[1]

    @on_timer(EXPIRY)
    def expire(self, seen: beam.transforms.userstate.ReadModifyWriteRuntimeState = beam.DoFn.StateParam(SEEN)) -> None:
        seen.clear()


class DeduplicateEvents(beam.PTransform):
    """Drops repeated event ids seen within ``horizon_seconds`` of processing time.

    In batch (``streaming=False``) ids are remembered for the whole run instead: the input is finite, its
    state is released when the run ends, and a processing-time timer would make portable runners such as
    Prism wait out the horizon in real time before finishing.
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
