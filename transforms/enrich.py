"""Enrichment of events with content metadata and engagement metrics (SPEC §3).

The content lookup is I/O and fails the bundle on a database outage (retried by the runner); the join and the
metrics are a pure function of the event and its content, so what that raises is the event's dead letter
(transforms/dead_letters.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.content import ContentLookup, ContentSnapshot, newest_snapshot
from transforms.dead_letters import DEAD_LETTER_TAG, RejectCounter
from transforms.engagement import engagement_pct, engagement_seconds
from transforms.lists import per_item
from transforms.model import Content, EngagementEvent, EnrichedEvent, Stage

ContentLookupFactory = Callable[[], ContentLookup]
"""Builds a point lookup on the worker; a factory so the DoFn pickles without an open connection."""


def enrich(event: EngagementEvent, content: Content | None) -> EnrichedEvent:
    """Join one event with its content row (or the lack of one) and compute its metrics."""
    # Not validated again: the event and the content were, and the metrics are SPEC §3's own functions.
    seconds = engagement_seconds(event.duration_ms)
    if content is None:
        return EnrichedEvent.trusted(
            event=event,
            engagement_seconds=seconds,
            engagement_pct=None,
            content_type=None,
            length_seconds=None,
            title=None,
            slug=None,
            content_missing=True,
        )
    return EnrichedEvent.trusted(
        event=event,
        engagement_seconds=seconds,
        engagement_pct=engagement_pct(seconds, content.length_seconds),
        content_type=content.content_type,
        length_seconds=content.length_seconds,
        title=content.title,
        slug=content.slug,
        content_missing=False,
    )


class EnrichEventsFn(beam.DoFn):
    """Looks each event's content up in the side-input snapshot, then in the fallback lookup if any."""

    def __init__(self, lookup_factory: ContentLookupFactory | None) -> None:
        self._lookup_factory = lookup_factory
        self._lookup: ContentLookup | None = None
        self._enriched = Metrics.counter("enrich", "enriched")
        self._missing = Metrics.counter("enrich", "content_missing")
        self._null_content_id = Metrics.counter("enrich", "content_id_null")
        self._fallback_hits = Metrics.counter("enrich", "fallback_lookup_hits")
        self._rejects = RejectCounter("enrich")

    def setup(self) -> None:
        if self._lookup_factory is not None:
            self._lookup = self._lookup_factory()
            self._lookup.setup()

    def start_bundle(self) -> None:
        self._snapshot: ContentSnapshot | None = None
        self._snapshot_chosen = False

    def process(self, event: EngagementEvent, snapshots: Iterable[ContentSnapshot]) -> Iterator[Any]:
        if not self._snapshot_chosen:
            # The view is fixed for the bundle, so pick the newest snapshot once, not per event.
            self._snapshot = newest_snapshot(snapshots)
            self._snapshot_chosen = True
        content = None
        if event.content_id is None:
            self._null_content_id.inc()
        else:
            if self._snapshot is not None:
                content = self._snapshot.get(event.content_id)
            if content is None and self._lookup is not None:
                content = self._lookup.get(event.content_id)
                if content is not None:
                    self._fallback_hits.inc()
        try:
            enriched = enrich(event, content)
        except Exception as error:  # noqa: BLE001 - a pure function of this event: its failure is the event's
            yield self._rejects.rejected(Stage.ENRICH, event, error)
            return
        if content is None:
            self._missing.inc()
        else:
            self._enriched.inc()
        yield enriched

    def teardown(self) -> None:
        if self._lookup is not None:
            self._lookup.teardown()
            self._lookup = None


class EnrichEvents(beam.PTransform):
    """EngagementEvent -> EnrichedEvent (``enriched``), joined with the newest content snapshot of a side
    input; events that cannot be enriched go to ``dead_letter``."""

    def __init__(
        self,
        content: beam.PCollection[ContentSnapshot],
        lookup_factory: ContentLookupFactory | None = None,
        event_lists: bool = False,
    ) -> None:
        """``event_lists``: the input holds lists of events, and so does the output (``transforms/lists.py``)."""
        super().__init__()
        self._content = content
        self._lookup_factory = lookup_factory
        self._event_lists = event_lists

    def expand(self, events: beam.PCollection[EngagementEvent]) -> beam.pvalue.DoOutputsTuple:
        join = per_item(EnrichEventsFn(self._lookup_factory), self._event_lists)
        return events | "JoinContent" >> beam.ParDo(join, beam.pvalue.AsList(self._content)).with_outputs(
            DEAD_LETTER_TAG, main="enriched"
        )
