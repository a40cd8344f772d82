"""The transform graph shared by the streaming job, the backfill and the tests.

raw records -> decode -> de-duplicate -> enrich (content side input) -> fixed-window aggregates
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from pipelines.options import CoreSettings
from transforms.aggregate import AggregateWindows
from transforms.content import ContentSnapshot
from transforms.dead_letters import DEAD_LETTER_TAG, flatten_dead_letters
from transforms.decode import DecodeRecords
from transforms.dedup import DeduplicateEvents
from transforms.enrich import ContentLookupFactory, EnrichEvents
from transforms.model import DeadLetter, EngagementEvent, EnrichedEvent, RawRecord, WindowAggregate
from transforms.resume import KeepResumableWindows


class CoreOutputs(NamedTuple):
    enriched: beam.PCollection[EnrichedEvent]
    """Or lists of them (``enriched_lists``): streaming's, and the backfill's built with ``event_lists``."""
    aggregates: beam.PCollection[WindowAggregate]
    """Every pane (Redis's)."""
    dead_letters: beam.PCollection[DeadLetter]
    enriched_lists: bool = False
    """Whether ``enriched`` holds lists of events rather than events."""
    coalesced_aggregates: beam.PCollection[WindowAggregate] | None = None
    """Streaming with ``settings.coalesce_panes_seconds``: the panes BigQuery's window_aggregates keeps."""


def build_core(
    raw: beam.PCollection[RawRecord | EngagementEvent],
    content: beam.PCollection[ContentSnapshot],
    settings: CoreSettings,
    content_lookup: ContentLookupFactory | None = None,
) -> CoreOutputs:
    """Applies the shared graph to ``raw``; ``content`` must hold a single (newest) snapshot per pane.

    ``raw`` holds records to decode, or events a source built itself from typed rows (the backfill's reader);
    with ``settings.event_lists``, lists of them. ``enriched`` holds lists of events when the input did, and in
    streaming, whose de-duplication emits lists."""
    lists = settings.event_lists
    decoded = raw | "Decode" >> DecodeRecords(settings.decode, event_lists=lists)
    unique = decoded.events
    if not settings.ids_unique_at_source:
        unique = unique | "Deduplicate" >> DeduplicateEvents(settings.dedup_horizon_seconds, settings.streaming)
        # Streaming's de-duplication emits lists of events, one per id block of a bundle.
        lists = settings.streaming
    enrich = unique | "Enrich" >> EnrichEvents(content, content_lookup, event_lists=lists)
    enriched = enrich.enriched
    to_aggregate = enriched
    if settings.windows_from is not None:
        to_aggregate = enriched | "Resumable windows" >> KeepResumableWindows(settings.windows_from, lists)
    panes = to_aggregate | "Aggregate" >> AggregateWindows(
        settings.windows, settings.streaming, lists, coalesce_seconds=settings.coalesce_panes_seconds
    )
    dead_letters = flatten_dead_letters("Core dead letters", decoded[DEAD_LETTER_TAG], enrich[DEAD_LETTER_TAG])
    return CoreOutputs(
        enriched=enriched,
        aggregates=panes.every,
        dead_letters=dead_letters,
        enriched_lists=lists,
        coalesced_aggregates=panes.coalesced,
    )
