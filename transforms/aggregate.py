"""Fixed event-time windows of per-content totals, fired early and corrected by late data (SPEC §5)."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms import trigger
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    ReadModifyWriteRuntimeState,
    RuntimeTimer,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import FixedWindows, GlobalWindow, GlobalWindows, IntervalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming, WindowedValue

from transforms.instants import epoch_micros, utc_datetime
from transforms.model import EVENT_TYPES, EnrichedEvent, WindowAggregate
from transforms.settings import setting
from transforms.state_cache import PickledCell, pickled_cell, prepare_worker_state

AggregateKey = tuple[str | None, bool]
"""(content id as a string or None, content_missing): disjoint groups, so totals add up across rows."""

_PANE_TIMING_NAMES = {
    PaneInfoTiming.EARLY: "EARLY",
    PaneInfoTiming.ON_TIME: "ON_TIME",
    PaneInfoTiming.LATE: "LATE",
    PaneInfoTiming.UNKNOWN: "UNKNOWN",
}


@dataclass
class EngagementTotals:
    """The running totals of one key in one window. Pure and mergeable."""

    event_count: int = 0
    type_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    engagement_seconds_sum: Decimal = Decimal("0.000")
    users: set[bytes] = field(default_factory=set)
    """Distinct user ids as their 16 bytes: half the pickle of their text, which every pane writes to state."""
    title: str | None = None
    slug: str | None = None
    content_type: str | None = None
    oldest_commit_ms: int | None = None
    """The earliest source commit among the events added (freshness metrics only)."""

    def add(self, event: EnrichedEvent) -> None:
        self.event_count += 1
        self.oldest_commit_ms = _earliest(self.oldest_commit_ms, event.event.committed_at_ms)
        if event.event.event_type is not None:
            self.type_counts[event.event.event_type] += 1
        if event.engagement_seconds is not None:
            self.engagement_seconds_sum += event.engagement_seconds
        if event.event.user_id is not None:
            self.users.add(event.event.user_id.bytes)
        if event.title is not None:
            self.title, self.slug, self.content_type = event.title, event.slug, event.content_type

    def merge(self, other: EngagementTotals) -> None:
        self.event_count += other.event_count
        self.oldest_commit_ms = _earliest(self.oldest_commit_ms, other.oldest_commit_ms)
        for event_type, count in other.type_counts.items():
            self.type_counts[event_type] += count
        self.engagement_seconds_sum += other.engagement_seconds_sum
        self.users |= other.users
        if other.title is not None:
            self.title, self.slug, self.content_type = other.title, other.slug, other.content_type


def _earliest(first: int | None, second: int | None) -> int | None:
    if first is None:
        return second
    return first if second is None else min(first, second)


class EngagementTotalsFn(beam.CombineFn):
    """Combines enriched events into ``EngagementTotals``.

    Each event is counted once because de-duplication runs upstream with a horizon at least as long as
    a window plus its allowed lateness (checked when the pipeline is built).
    """

    def create_accumulator(self) -> EngagementTotals:
        return EngagementTotals()

    def add_input(self, totals: EngagementTotals, event: EnrichedEvent) -> EngagementTotals:
        totals.add(event)
        return totals

    def merge_accumulators(self, accumulators: Iterable[EngagementTotals]) -> EngagementTotals:
        merged = EngagementTotals()
        for totals in accumulators:
            merged.merge(totals)
        return merged

    def extract_output(self, totals: EngagementTotals) -> EngagementTotals:
        return totals


class MergeTotalsFn(EngagementTotalsFn):
    """Combines partial ``EngagementTotals`` (``SumListsPerWindowFn``'s) rather than events."""

    def add_input(self, totals: EngagementTotals, partial: EngagementTotals) -> EngagementTotals:  # type: ignore[override]
        totals.merge(partial)
        return totals


class SumListsPerWindowFn(beam.DoFn):
    """list[EnrichedEvent] -> ((key, window start in µs), partial totals): one element per window and content
    of each bundle, in the global window (``transforms/lists.py``).

    Lists of events carry no event times of their own, so the fixed window of each event is computed here,
    as ``FixedWindows`` assigns it (start = event time rounded down to a multiple of the size, offset 0), and
    travels in the key. That also spares the backfill ``WindowInto``, Beam's dearest per-element step (7 µs an
    event, docs/benchmarks.md, backfill session 18). The partials span the bundle, not one list: a list of a
    thousand events read in id order holds about as many windows and contents, so per list they would add
    nothing up and only cost the combine a merge each.
    """

    def __init__(self, window_seconds: int) -> None:
        self._size_micros = window_seconds * 1_000_000
        self._partials: dict[tuple[AggregateKey, int], EngagementTotals] = {}

    def start_bundle(self) -> None:
        self._partials = {}

    def process(self, events: Iterable[EnrichedEvent]) -> None:
        size = self._size_micros
        partials = self._partials
        for event in events:
            micros = epoch_micros(event.event.event_ts)
            key = (aggregate_key(event), micros - micros % size)
            totals = partials.get(key)
            if totals is None:
                totals = partials[key] = EngagementTotals()
            totals.add(event)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for keyed in self._partials.items():
            yield WindowedValue(keyed, MIN_TIMESTAMP, [GlobalWindow()])
        self._partials = {}


class SumListsWithinBundleFn(SumListsPerWindowFn):
    """list[EnrichedEvent] -> (key, partial totals) at the last instant of its window: one element per window
    and content of each bundle, for streaming's triggered windows.

    What a runner does when it lifts a combine, done by hand: under a count trigger neither Prism nor the
    FnApiRunner lifts one, and every event crossed into the aggregation on its own. Each partial is stamped
    with its window's last timestamp, so ``WindowInto(FixedWindows)`` after it puts it in its events' window,
    where lateness and pane timing, which depend on the window alone, are the same as theirs. Still in the
    global window here: windows are assigned after the sums, once per partial.
    """

    def finish_bundle(self) -> Iterator[WindowedValue]:
        last = self._size_micros - 1
        for (key, start), totals in self._partials.items():
            yield WindowedValue((key, totals), Timestamp(micros=start + last), [GlobalWindow()])
        self._partials = {}


class WindowKeyToAggregateFn(beam.DoFn):
    """((key, window start in µs), totals) -> the window's one row, as batch fires it: a single on-time pane."""

    ONLY_PANE = PaneInfo(True, True, PaneInfoTiming.ON_TIME, 0, 0)

    def __init__(self, window_seconds: int) -> None:
        self._size_micros = window_seconds * 1_000_000
        self._on_time = Metrics.counter("aggregate", "panes_on_time")

    def process(self, keyed: tuple[tuple[AggregateKey, int], EngagementTotals]) -> Iterator[WindowAggregate]:
        (key, start), totals = keyed
        window = IntervalWindow(Timestamp(micros=start), Timestamp(micros=start + self._size_micros))
        self._on_time.inc()
        yield to_window_aggregate(key, totals, window, self.ONLY_PANE, datetime.now(UTC))


def aggregate_key(event: EnrichedEvent) -> AggregateKey:
    content_id = event.event.content_id
    return (str(content_id) if content_id is not None else None, event.content_missing)


def to_window_aggregate(
    key: AggregateKey, totals: EngagementTotals, window: IntervalWindow, pane: PaneInfo, emitted_at: datetime
) -> WindowAggregate:
    content_id, content_missing = key
    return WindowAggregate(
        window_start=utc_datetime(window.start.micros),
        window_end=utc_datetime(window.end.micros),
        content_id=content_id,
        content_missing=content_missing,
        title=totals.title,
        slug=totals.slug,
        content_type=totals.content_type,
        event_count=totals.event_count,
        play_count=totals.type_counts["play"],
        pause_count=totals.type_counts["pause"],
        finish_count=totals.type_counts["finish"],
        click_count=totals.type_counts["click"],
        engagement_seconds_sum=totals.engagement_seconds_sum,
        distinct_users=len(totals.users),
        pane_timing=_PANE_TIMING_NAMES.get(pane.timing, "UNKNOWN"),
        pane_index=pane.index,
        emitted_at=emitted_at,
        oldest_commit_ms=totals.oldest_commit_ms,
    )


class ToWindowAggregateFn(beam.DoFn):
    def __init__(self) -> None:
        self._panes = {
            name: Metrics.counter("aggregate", f"panes_{name.lower()}") for name in _PANE_TIMING_NAMES.values()
        }

    def process(
        self,
        keyed: tuple[AggregateKey, EngagementTotals],
        window: IntervalWindow = beam.DoFn.WindowParam,
        pane: PaneInfo = beam.DoFn.PaneInfoParam,
    ) -> Iterator[WindowAggregate]:
        key, totals = keyed
        aggregate = to_window_aggregate(key, totals, window, pane, datetime.now(UTC))
        self._panes[aggregate.pane_timing].inc()
        yield aggregate


STATE_SHARDS = 16
"""Default number of state keys per window in ``AccumulatePanes`` (``--aggregate_state_shards``)."""


@dataclass(frozen=True)
class WindowSettings:
    """How windows are cut and fired; validated once, shared by streaming and backfill."""

    window_seconds: int = setting(
        60,
        flag="--window_seconds",
        type=int,
        help="Length of the fixed event-time windows of the per-content aggregates, in seconds.",
    )
    allowed_lateness_seconds: int = setting(
        300,
        flag="--allowed_lateness_seconds",
        type=int,
        help="How long after a window ends late events still correct its aggregates, in seconds.",
    )
    early_firing_seconds: int = setting(
        0,
        flag="--early_firing_seconds",
        type=int,
        help=(
            "Processing-time delay after which a window emits an early (partial) result, in whole seconds. "
            "0 emits one as soon as new data reaches the window: a pane per key for each batch of events "
            "the runner hands the aggregation."
        ),
    )
    """Whole seconds, as Beam's portable trigger protocol round-trips only those; 0 fires an early pane as soon
    as data reaches the aggregation (``window_trigger``); unused in batch."""
    state_shards: int = setting(
        STATE_SHARDS,
        flag="--aggregate_state_shards",
        type=int,
        help=(
            "Streaming: state keys per window in the step that adds panes up, each holding the totals of the "
            "contents that hash to it. Fewer keys make fewer state requests per bundle; more spread a window "
            "over more workers and rewrite less state per pane. Raise it with the number of contents that get "
            "events every second (thousands: 64 or more)."
        ),
    )
    """Streaming only: ``AccumulatePanesFn`` keeps one state cell per (shard, window), not per (content, window)."""

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self.allowed_lateness_seconds < 0:
            raise ValueError("allowed_lateness_seconds must not be negative")
        if self.early_firing_seconds < 0:
            raise ValueError("early_firing_seconds must not be negative")
        if self.state_shards < 1:
            raise ValueError("aggregate_state_shards must be at least 1")

    @property
    def open_seconds(self) -> int:
        """How long, in event time, a window keeps accepting data."""
        return self.window_seconds + self.allowed_lateness_seconds


def window_trigger(settings: WindowSettings, streaming: bool) -> trigger.TriggerFn:
    """Streaming: early panes every ``early_firing_seconds``, the on-time pane, then a pane per late bundle.

    With ``early_firing_seconds`` 0 the early panes fire on count, as soon as data reaches the aggregation,
    which saves the wait for a processing-time delay (half a second on average at 1 s). A runner fires such a
    pane per key for each batch of elements it hands the aggregation: Dataflow per work item, Prism per
    upstream bundle with our patch 0007 (experiment ``prism_fire_panes_per_batch``, set by
    ``pipelines.local_runner``), without which Prism fires a pane, and runs a bundle, per element.

    Late data fires on count rather than after a processing delay: the Python DirectRunner's trigger driver
    fails on a processing-time late trigger, and a pane per late bundle is already bounded by the bundles a
    runner makes.

    Batch has no processing time to fire early on: Beam's default trigger fires the on-time pane and a pane
    for late data (a local runner may move the watermark between bundles), each accumulating the window's
    whole value. It also lets runners lift the combine, adding events up before the shuffle rather than
    shuffling every event: Prism and the FnApiRunner lift no combine under a count trigger.
    """
    if not streaming:
        return trigger.DefaultTrigger()
    early = (
        trigger.AfterProcessingTime(settings.early_firing_seconds)
        if settings.early_firing_seconds > 0
        else trigger.AfterCount(1)
    )
    return trigger.AfterWatermark(early=early, late=trigger.AfterCount(1))


PaneDelta = tuple[IntervalWindow, int, int, EngagementTotals]
"""(window, pane timing, pane index, what the pane adds): a discarding pane, taken out of its window."""


def pane_delta(
    keyed: tuple[AggregateKey, EngagementTotals],
    window: IntervalWindow = beam.DoFn.WindowParam,
    pane: PaneInfo = beam.DoFn.PaneInfoParam,
) -> Iterator[tuple[tuple[AggregateKey, int], PaneDelta]]:
    """Keys a pane by (key, window start) and carries its window and pane along into the global window."""
    key, delta = keyed
    yield (key, window.start.micros), (window, pane.timing, pane.index, delta)


def state_shard(key: AggregateKey, shards: int) -> int:
    """The state shard of a content: stable across workers and runs (crc32, not ``hash``)."""
    content_id, content_missing = key
    return zlib.crc32(f"{content_id}/{content_missing}".encode()) % shards


ShardPanes = tuple[IntervalWindow, list[tuple[AggregateKey, int, EngagementTotals]]]
"""(window, [(key, pane timing, what the pane adds), ...]): a bundle's panes of one window and state shard."""


class PanesPerShardFn(beam.DoFn):
    """((key, window start), pane delta) -> ((shard, window start), the bundle's panes of that shard and window).

    One element per shard and window of each bundle, so ``AccumulatePanesFn`` reads and writes one state cell for
    all of them: a state request costs the Python worker more than the pane it carries (docs/benchmarks.md,
    session 25). Emitted in the global window, stamped with the earliest of the panes' timestamps."""

    def __init__(self, shards: int) -> None:
        self._shards = shards

    def start_bundle(self) -> None:
        self._groups: dict[tuple[int, int], tuple[IntervalWindow, list]] = {}
        self._earliest: dict[tuple[int, int], Timestamp] = {}

    def process(
        self, keyed: tuple[tuple[AggregateKey, int], PaneDelta], timestamp: Timestamp = beam.DoFn.TimestampParam
    ) -> None:
        (key, start), (window, timing, _, delta) = keyed
        group_key = (state_shard(key, self._shards), start)
        self._groups.setdefault(group_key, (window, []))[1].append((key, timing, delta))
        self._earliest[group_key] = min(timestamp, self._earliest.get(group_key, timestamp))

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for group_key, shard_panes in self._groups.items():
            yield WindowedValue((group_key, shard_panes), self._earliest[group_key], [GlobalWindow()])
        self._groups, self._earliest = {}, {}


@dataclass
class _WindowState:
    """``AccumulatePanesFn``'s state for one key and window."""

    totals: EngagementTotals = field(default_factory=EngagementTotals)
    panes: int = 0
    """Panes emitted so far: the next pane's index."""
    last_sent_ms: int | None = None
    """When a pane last went to BigQuery (coalescing only)."""
    pending: WindowAggregate | None = None
    """The newest pane not yet sent to BigQuery (coalescing only)."""


@dataclass
class _ShardState:
    """``AccumulatePanesFn``'s state for one shard of contents in one window."""

    contents: dict[AggregateKey, _WindowState] = field(default_factory=dict)
    flush_at_ms: int | None = None
    """When the flush timer is set to fire (coalescing only): the earliest due of the panes waiting."""


class AccumulatePanesFn(beam.DoFn):
    """Adds each discarding pane's delta to its window's running totals and emits the totals so far.

    Keyed state (the totals and the number of panes emitted) is committed atomically with the outputs, so
    every delta is added exactly once. The state lives in the global window, keyed by (shard of the content,
    window start): one cell per shard holds the totals of its contents (``PanesPerShardFn`` groups a bundle's
    panes by shard). An event-time timer drops it once the window can no longer change (end + allowed lateness):
    Prism 2.73.0 gives a stateful ParDo no allowed lateness and would drop per-window state at the window's end,
    before its late panes.

    With ``coalesce_seconds`` > 0 it also emits, on ``COALESCED``, the panes BigQuery keeps: a window's first
    pane at once, then at most one per ``coalesce_seconds``, the newest, and what is still waiting when the
    window can no longer change. Early panes fire every second or so while a window gets data, late data fires
    a pane per bundle (after a resume, a pane per element); each carries the window's full value, so only the
    newest of a burst matters. Coalescing here, where the key and the panes already are, spares a shuffle and
    a stage.

    A bundle costs one state read and one write per shard and window it touches, and the expiry timer is set
    once per shard and window: state requests, not the panes, were what this step cost the worker
    (docs/benchmarks.md, sessions 21 and 25).
    """

    COALESCED = "coalesced"
    WINDOW = pickled_cell("shard")
    """One cell per (shard, window): a ``_ShardState``."""
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)

    def __init__(self, allowed_lateness_seconds: int, coalesce_seconds: int = 0) -> None:
        self._lateness = Duration.of(allowed_lateness_seconds)
        self._interval_ms = coalesce_seconds * 1000
        self._panes = {
            name: Metrics.counter("aggregate", f"panes_{name.lower()}") for name in _PANE_TIMING_NAMES.values()
        }
        self._passed = Metrics.counter("aggregate", "bigquery_panes_written")
        self._coalesced = Metrics.counter("aggregate", "bigquery_panes_coalesced")

    def setup(self) -> None:
        prepare_worker_state()

    def process(
        self,
        keyed: tuple[tuple[int, int], ShardPanes],
        window_state: ReadModifyWriteRuntimeState = beam.DoFn.StateParam(WINDOW),
        expiry: RuntimeTimer = beam.DoFn.TimerParam(EXPIRY),
        flush: RuntimeTimer = beam.DoFn.TimerParam(FLUSH),
    ) -> Iterator[WindowAggregate | TaggedOutput]:
        _, (window, panes) = keyed
        cell = PickledCell(window_state)
        shard: _ShardState = cell.read() or _ShardState()
        if not shard.contents:
            # Once per shard and window: every timer set is a message to the runner.
            expiry.set(window.end + self._lateness)
        emitted_at = datetime.now(UTC)
        for key, timing, delta in panes:
            state = shard.contents.get(key)
            if state is None:
                state = shard.contents[key] = _WindowState()
            state.totals.merge(delta)
            # The pane's index is counted here: sinks keep the highest, and Prism's pane indices are not in
            # firing order (docs/local-streaming.md, "Pane labels").
            pane = PaneInfo(state.panes == 0, False, timing, state.panes, -1)
            state.panes += 1
            aggregate = to_window_aggregate(key, state.totals, window, pane, emitted_at)
            # Freshness is about what this pane adds, not about the window's first event.
            aggregate = aggregate.model_copy(update={"oldest_commit_ms": delta.oldest_commit_ms})
            self._panes[aggregate.pane_timing].inc()
            to_bigquery_now = self._interval_ms > 0 and self._coalesce(aggregate, state)
            yield aggregate
            if to_bigquery_now:
                yield TaggedOutput(self.COALESCED, aggregate)
        self._arm_flush(shard, flush)
        cell.write(shard)

    def _coalesce(self, aggregate: WindowAggregate, state: _WindowState) -> bool:
        """Whether ``aggregate`` goes on to BigQuery now; if not, it waits in ``state`` as the newest pane."""
        now_ms = int(time.time() * 1000)
        if state.last_sent_ms is None or now_ms - state.last_sent_ms >= self._interval_ms:
            state.pending, state.last_sent_ms = None, now_ms
            self._passed.inc()
            return True
        if state.pending is not None:
            self._coalesced.inc()  # the waiting pane is older: this one replaces it
        state.pending = aggregate
        return False

    def _flush_due_ms(self, state: _WindowState) -> int | None:
        """When the pane waiting in ``state`` is let through to BigQuery; None if none waits."""
        if state.pending is None or state.last_sent_ms is None:
            return None
        return flush_due_ms(state.last_sent_ms, self._interval_ms)

    def _arm_flush(self, shard: _ShardState, flush: RuntimeTimer) -> None:
        """Sets the flush timer to the earliest due of the panes waiting, unless it is already set that early."""
        dues = [due for state in shard.contents.values() if (due := self._flush_due_ms(state)) is not None]
        if not dues:
            return
        due = min(dues)
        if shard.flush_at_ms is None or due < shard.flush_at_ms:
            flush.set(Timestamp(micros=due * 1000))
            shard.flush_at_ms = due

    def _take_pending(self, state: _WindowState) -> list[TaggedOutput]:
        """The pane waiting in ``state`` for BigQuery, taken out of it (none if nothing waits)."""
        if state.pending is None:
            return []
        pending, state.pending = state.pending, None
        self._passed.inc()
        return [TaggedOutput(self.COALESCED, pending)]

    @on_timer(FLUSH)
    def flush(
        self,
        window_state: ReadModifyWriteRuntimeState = beam.DoFn.StateParam(WINDOW),
        flush: RuntimeTimer = beam.DoFn.TimerParam(FLUSH),
    ) -> Iterator[TaggedOutput]:
        cell = PickledCell(window_state)
        shard: _ShardState | None = cell.read()
        if shard is None:
            return
        now_ms = int(time.time() * 1000)
        shard.flush_at_ms = None
        for state in shard.contents.values():
            due = self._flush_due_ms(state)
            if due is not None and due <= now_ms:
                yield from self._take_pending(state)
                state.last_sent_ms = now_ms
        self._arm_flush(shard, flush)
        cell.write(shard)

    @on_timer(EXPIRY)
    def expire(
        self, window_state: ReadModifyWriteRuntimeState = beam.DoFn.StateParam(WINDOW)
    ) -> Iterator[TaggedOutput]:
        # The window can no longer change: what is still waiting is its final value.
        cell = PickledCell(window_state)
        shard: _ShardState | None = cell.read()
        cell.clear()
        if shard is not None:
            for state in shard.contents.values():
                yield from self._take_pending(state)


class WindowPanes(NamedTuple):
    """``AggregateWindows``' output: every pane (accumulated), and the coalesced ones when asked for."""

    every: beam.PCollection[WindowAggregate]
    coalesced: beam.PCollection[WindowAggregate] | None = None
    """Streaming with ``coalesce_seconds`` > 0: per window and content, at most one pane per that many
    seconds, the newest, and the window's final value (``AccumulatePanesFn``)."""


class AggregateWindows(beam.PTransform):
    """EnrichedEvent -> WindowAggregate: one row per (window, content) per fired pane, accumulated
    (``WindowPanes.every``), and in streaming, if asked, the same panes coalesced for BigQuery.

    Early panes fire as data arrives (or ``early_firing_seconds`` after it, when positive), the on-time pane when the
    watermark passes the window's end, and a late pane for each bundle of late data within allowed
    lateness. Each row carries the window's full value so far, so sinks overwrite and never add.

    In streaming, panes are fired DISCARDING (each carries only what is new) and a stateful step adds
    them up (``AccumulatePanesFn``). That is the accumulating result, computed so that the aggregation does
    not keep every element of an open window pending: on Prism, pending elements hold the aggregation's watermark until
    the window expires, and Prism moves a stage's output downstream only when its watermark advances,
    so accumulating early panes reached the sinks minutes late (docs/local-streaming.md, "Early panes").
    Batch fires one pane per window, where the two modes are the same, and skips the stateful step.
    """

    def __init__(
        self, settings: WindowSettings, streaming: bool = True, event_lists: bool = False, coalesce_seconds: int = 0
    ) -> None:
        """``event_lists``: the input holds lists of events (``transforms/lists.py``), as it must in streaming.
        ``coalesce_seconds``: streaming only, also output the panes coalesced to one per that many seconds
        (``WindowPanes.coalesced``); batch fires one pane per window, which needs no coalescing."""
        super().__init__()
        if streaming and not event_lists:
            raise ValueError("streaming sums lists of events (its de-duplication's output): event_lists must be set")
        if coalesce_seconds < 0:
            raise ValueError("coalesce_seconds must not be negative")
        self._settings = settings
        self._streaming = streaming
        self._event_lists = event_lists
        self._coalesce_seconds = coalesce_seconds if streaming else 0
        self._state_shards = settings.state_shards

    def expand(self, events: beam.PCollection[EnrichedEvent]) -> WindowPanes:
        settings = self._settings
        if self._event_lists and not self._streaming:
            # The window travels in the key and the events stay in the global window: one pane per window,
            # as batch's default trigger fires it (late panes cannot happen: there is no watermark to pass).
            return WindowPanes(
                events
                | "SumPerWindowInList" >> beam.ParDo(SumListsPerWindowFn(settings.window_seconds))
                | "SumPerContent" >> beam.CombinePerKey(MergeTotalsFn())
                | "ToRows" >> beam.ParDo(WindowKeyToAggregateFn(settings.window_seconds))
            )
        windowed = beam.WindowInto(
            FixedWindows(settings.window_seconds),
            trigger=window_trigger(settings, self._streaming),
            accumulation_mode=(
                trigger.AccumulationMode.DISCARDING if self._streaming else trigger.AccumulationMode.ACCUMULATING
            ),
            allowed_lateness=Duration.of(settings.allowed_lateness_seconds),
        )
        if not self._streaming:
            # Batch's default trigger lets the runner lift the combine itself.
            panes = (
                events
                | "FixedWindows" >> windowed
                | "KeyByContent" >> beam.Map(lambda event: (aggregate_key(event), event))
                | "SumPerContent" >> beam.CombinePerKey(EngagementTotalsFn())
            )
            return WindowPanes(panes | "ToRows" >> beam.ParDo(ToWindowAggregateFn()))
        accumulate = AccumulatePanesFn(settings.allowed_lateness_seconds, self._coalesce_seconds)
        panes = (
            events
            | "SumWithinBundle" >> beam.ParDo(SumListsWithinBundleFn(settings.window_seconds))
            | "FixedWindows" >> windowed
            | "SumPerContent" >> beam.CombinePerKey(MergeTotalsFn())
            | "PaneDeltas" >> beam.ParDo(pane_delta)
            | "GlobalWindow" >> beam.WindowInto(GlobalWindows())
            | "PanesPerShard" >> beam.ParDo(PanesPerShardFn(self._state_shards))
            | "AccumulatePanes" >> beam.ParDo(accumulate).with_outputs(AccumulatePanesFn.COALESCED, main="every")
        )
        coalesced = panes[AccumulatePanesFn.COALESCED] if self._coalesce_seconds else None
        return WindowPanes(panes.every, coalesced)


FLUSH_GRID_MS = 1000
"""Coalesced panes are flushed on this wall-clock grid (``flush_due_ms``)."""


def flush_due_ms(last_sent_ms: int, interval_ms: int) -> int:
    """When a key's waiting pane is let through: ``interval_ms`` after its last one, rounded up to the grid.

    Every key's flush timer then falls on a whole second, and a runner fires timers that are due together in
    one bundle; with a timer at its own millisecond per key and window, the flushes and the BigQuery batching
    after them were half of the streaming job's bundles at low rates (docs/benchmarks.md, session 13).
    """
    due = last_sent_ms + interval_ms
    return -(-due // FLUSH_GRID_MS) * FLUSH_GRID_MS
