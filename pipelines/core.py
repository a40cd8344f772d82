"""The transform graph shared by the streaming job, the backfill and the tests.

raw records -> decode -> de-duplicate -> enrich (content side input) -> fixed-window aggregates
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import CoreOptions
from transforms.aggregate import AggregateWindows, WindowSettings
from transforms.content import ContentSnapshot
from transforms.dead_letters import DEAD_LETTER_TAG, flatten_dead_letters
from transforms.decode import DecodeLimits, DecodeRecords
from transforms.dedup import DeduplicateEvents
from transforms.enrich import ContentLookupFactory, EnrichEvents
from transforms.model import DeadLetter, EngagementEvent, EnrichedEvent, RawRecord, WindowAggregate
from transforms.resume import KeepResumableWindows


@dataclass(frozen=True)
class CoreSettings:
    windows: WindowSettings = field(default_factory=WindowSettings)
    dedup_horizon_seconds: int = 600
    streaming: bool = True
    windows_from: datetime | None = None
    """A resumed job's re-read start: earlier windows were final before the restart (transforms/resume.py)."""
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    ids_unique_at_source: bool = False
    """True when the source cannot hold two records with one id: the backfill reads PostgreSQL, where ``id``
    is the primary key and the read splits are disjoint id ranges. The batch de-duplication, a GroupByKey
    that holds every event in the runner, is then skipped. A stream (Kafka redelivers) always de-duplicates."""

    def __post_init__(self) -> None:
        if self.streaming and self.ids_unique_at_source:
            raise ValueError("a stream can deliver an id twice: ids_unique_at_source is for bounded sources only")
        # A duplicate arriving after the horizon but while its window is still open would be counted
        # twice in the aggregate, so the horizon must cover a window's whole open life.
        if self.dedup_horizon_seconds < self.windows.open_seconds:
            raise ValueError(
                f"dedup_horizon_seconds ({self.dedup_horizon_seconds}) must be at least "
                f"window_seconds + allowed_lateness_seconds ({self.windows.open_seconds})"
            )

    @classmethod
    def from_options(cls, options: PipelineOptions, streaming: bool) -> CoreSettings:
        core = options.view_as(CoreOptions)
        return cls(
            windows=WindowSettings(
                window_seconds=core.window_seconds,
                allowed_lateness_seconds=core.allowed_lateness_seconds,
                early_firing_seconds=core.early_firing_seconds,
            ),
            dedup_horizon_seconds=core.dedup_horizon_seconds,
            streaming=streaming,
            decode=DecodeLimits(max_record_bytes=core.max_record_bytes),
        )


class CoreOutputs(NamedTuple):
    enriched: beam.PCollection[EnrichedEvent]
    aggregates: beam.PCollection[WindowAggregate]
    dead_letters: beam.PCollection[DeadLetter]


def build_core(
    raw: beam.PCollection[RawRecord | EngagementEvent],
    content: beam.PCollection[ContentSnapshot],
    settings: CoreSettings,
    content_lookup: ContentLookupFactory | None = None,
) -> CoreOutputs:
    """Applies the shared graph to ``raw``; ``content`` must hold a single (newest) snapshot per pane.

    ``raw`` holds records to decode, or events a source built itself from typed rows (the backfill's reader)."""
    decoded = raw | "Decode" >> DecodeRecords(settings.decode)
    unique = decoded.events
    if not settings.ids_unique_at_source:
        unique = unique | "Deduplicate" >> DeduplicateEvents(settings.dedup_horizon_seconds, settings.streaming)
    enrich = unique | "Enrich" >> EnrichEvents(content, content_lookup)
    enriched = enrich.enriched
    to_aggregate = enriched
    if settings.windows_from is not None:
        to_aggregate = enriched | "Resumable windows" >> KeepResumableWindows(settings.windows_from)
    aggregates = to_aggregate | "Aggregate" >> AggregateWindows(settings.windows, settings.streaming)
    dead_letters = flatten_dead_letters("Core dead letters", decoded[DEAD_LETTER_TAG], enrich[DEAD_LETTER_TAG])
    return CoreOutputs(enriched=enriched, aggregates=aggregates, dead_letters=dead_letters)
