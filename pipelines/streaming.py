"""The streaming main job: Kafka (Debezium CDC and plain JSON) -> core transforms -> BigQuery, Redis, HTTP API.

    python -m pipelines.streaming --runner=DataflowRunner ...       # production (flex template: templates/)
    scripts/run-local                                               # this machine: Prism + the local stack

``build_pipeline`` is exposed for tests; ``run`` adds the preflight checks and the runner.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions
from apache_beam.utils.subprocess_server import SubprocessServer

from pipelines.core import CoreSettings, build_core
from pipelines.options import CoreOptions, postgres_from_options, with_state_cache
from pipelines.outputs import SinkSettings, write_outputs
from pipelines.preflight import PreflightError, check_postgres
from transforms.bigquery_reads import BigQueryReadSettings
from transforms.content import (
    ContentSnapshot,
    PostgresContentLoader,
    PostgresContentLookup,
    ReadContentOnce,
    RefreshingContent,
)
from transforms.enrich import ContentLookupFactory
from transforms.kafka_source import KafkaReadOptions, KafkaReadSettings, ReadRawRecordsFromKafka
from transforms.postgres import PostgresDsn
from transforms.resume import (
    BigQueryIdsSince,
    BigQueryProgress,
    LastProcessedAt,
    ResumeOptions,
    ResumePlan,
    intents_since,
    plan_resume,
)
from transforms.settings import print_options_help
from transforms.sinks.bigquery import BigQuerySinkOptions
from transforms.sinks.http_api import HttpSinkOptions
from transforms.sinks.http_intents import IntentsSince
from transforms.sinks.redis_top import RedisSinkOptions

_log = logging.getLogger(__name__)

OPTION_CLASSES: tuple[type[PipelineOptions], ...] = (
    CoreOptions,
    KafkaReadOptions,
    BigQuerySinkOptions,
    RedisSinkOptions,
    HttpSinkOptions,
    ResumeOptions,
)
"""The job's own options (the flex template's parameters: templates/launch.py)."""


@dataclass(frozen=True)
class StreamingPlan:
    """Everything the streaming graph is built from, decided once at launch. Options are read, never changed."""

    kafka: KafkaReadSettings
    """With the real start: ``--start_offset=resume`` is resolved to a time here."""
    core: CoreSettings
    """For a resume: windows from the re-read's start, lateness and de-dup horizon widened to cover it."""
    sinks: SinkSettings
    """For a resume: the ids each sink already holds from the overlap."""
    postgres: PostgresDsn
    """The content table's database, its password (if any) read by the workers (``postgres_from_options``)."""
    resume: ResumePlan | None = None


def plan_from_options(
    options: PipelineOptions, now: datetime | None = None, progress: LastProcessedAt | None = None
) -> StreamingPlan:
    """The job's plan. Only ``--start_offset=resume`` reads anything: ``progress`` (default: BigQuery's
    ``enriched_events``) says where the last run got to."""
    now = now or datetime.now(UTC)
    # run() forces --streaming; a bounded run (the FnApiRunner integration test) takes the bounded core, as the
    # BigQuery sink does, because the FnApiRunner cannot fire processing-time triggers.
    core = CoreSettings.from_options(options, streaming=options.view_as(StandardOptions).streaming)
    bigquery_read = BigQueryReadSettings.from_options(options)
    start_offset, resume = plan_start(options, core, now, progress or BigQueryProgress(bigquery_read))
    if resume is not None:
        core = resumed_settings(core, resume, now)
    sinks = SinkSettings.from_options(options, window_seconds=core.windows.window_seconds)
    # BigQuery's panes are coalesced where they are added up (AccumulatePanesFn); a bounded core ignores this.
    core = dataclasses.replace(core, coalesce_panes_seconds=sinks.bigquery.pane_interval_seconds)
    if resume is not None:
        http, http_holds = sinks.http, None
        if http is not None and http.intents is not None:
            since = intents_since(resume.read_from, resume.last_processed_at, http.retry.max_retry_seconds)
            replay = IntentsSince(bigquery_read, http.intents.spec.table, since)
            http, http_holds = dataclasses.replace(http, replay=replay), replay.ids
        sinks = dataclasses.replace(
            sinks,
            bigquery_holds=BigQueryIdsSince(bigquery_read, resume.read_from),
            http=http,
            http_holds=http_holds,
        )
    kafka = KafkaReadSettings.from_options(options, start_offset=start_offset)
    return StreamingPlan(kafka=kafka, core=core, sinks=sinks, resume=resume, postgres=postgres_from_options(options))


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions, plan: StreamingPlan | None = None) -> None:
    """Applies the whole streaming graph to ``pipeline``: read, core, outputs. Plans first unless given ``plan``."""
    plan = plan or plan_from_options(options)
    raw = pipeline | "Read Kafka" >> ReadRawRecordsFromKafka(plan.kafka)
    content, lookup = content_sources(pipeline, options.view_as(CoreOptions), plan.postgres)
    core = build_core(raw, content, plan.core, content_lookup=lookup)
    write_outputs(core, plan.sinks)


def content_sources(
    pipeline: beam.Pipeline, core_options: CoreOptions, dsn: PostgresDsn
) -> tuple[beam.PCollection[ContentSnapshot], ContentLookupFactory | None]:
    """The content side input (refreshing, or read once) and the point lookup behind it, if enabled."""
    refresh = core_options.content_refresh_seconds
    # With the side input read once, the lookup's expiring cache is what brings content edits in.
    hit_ttl = refresh if refresh > 0 else 60.0
    lookup = (
        (lambda: PostgresContentLookup(dsn, hit_ttl_seconds=hit_ttl))
        if core_options.content_lookup == "postgres"
        else None
    )
    if refresh > 0:
        content = pipeline | "Content snapshots" >> RefreshingContent(
            PostgresContentLoader(dsn), interval_seconds=refresh
        )
    else:
        # Prism cannot serve a triggered global-window side input (apache/beam#31438): read the table
        # once and let the point lookup cover what is created or edited later.
        content = pipeline | "Content snapshot" >> ReadContentOnce(PostgresContentLoader(dsn))
    return content, lookup


def resumed_settings(settings: CoreSettings, resume: ResumePlan, now: datetime) -> CoreSettings:
    """The core's settings for a resumed job: windows from the resume point, and room for the re-read.

    KafkaIO's watermark follows processing time, so re-read events of the overlap arrive "late" by up to
    ``now - read_from``. The allowed lateness, and with it the de-duplication horizon, grows by that much
    (plus as much again for the catch-up itself), so the overlap's windows are recomputed rather than dropped.
    """
    extra = 2 * max(0, int((now - resume.read_from).total_seconds()))
    windows = dataclasses.replace(
        settings.windows, allowed_lateness_seconds=settings.windows.allowed_lateness_seconds + extra
    )
    _log.info(
        "resume: allowed lateness %d s and de-duplication horizon %d s for the re-read",
        windows.allowed_lateness_seconds,
        settings.dedup_horizon_seconds + extra,
    )
    return dataclasses.replace(
        settings,
        windows=windows,
        dedup_horizon_seconds=settings.dedup_horizon_seconds + extra,
        windows_from=resume.read_from,
    )


def plan_start(
    options: PipelineOptions, settings: CoreSettings, now: datetime, progress: LastProcessedAt
) -> tuple[str, ResumePlan | None]:
    """Where KafkaIO starts, and the resume plan when ``--start_offset=resume`` has one (transforms/resume.py).

    Any other ``--start_offset`` is returned as it is. Without a usable plan (a first run, or a stop longer
    than ``--resume_max_gap_seconds``) the job starts with the windows that are still open; older data is the
    backfill's.
    """
    start_offset = options.view_as(KafkaReadOptions).start_offset
    if start_offset != "resume":
        return start_offset, None
    resume_options = options.view_as(ResumeOptions)
    plan = plan_resume(
        progress,
        settings.windows.window_seconds,
        settings.windows.allowed_lateness_seconds,
        resume_options.resume_margin_seconds,
    )
    fresh_start = (now - timedelta(seconds=settings.windows.open_seconds)).isoformat()
    if plan is None:
        _log.info("resume: enriched_events is empty (a first run); reading from %s", fresh_start)
        return fresh_start, None
    if (now - plan.last_processed_at).total_seconds() > resume_options.resume_max_gap_seconds:
        _log.warning(
            "resume: the last run stopped at %s, more than --resume_max_gap_seconds=%d ago; reading from %s. "
            "Fill the gap with: scripts/backfill --start %s --end %s",
            plan.last_processed_at.isoformat(),
            resume_options.resume_max_gap_seconds,
            fresh_start,
            plan.read_from.isoformat(),
            fresh_start,
        )
        return fresh_start, None
    _log.info(plan.describe())
    return plan.read_from.isoformat(), plan


def run(argv: list[str] | None = None) -> None:
    options = PipelineOptions(with_state_cache(list(sys.argv[1:] if argv is None else argv)))
    options.view_as(StandardOptions).streaming = True
    # DoFns refer to module-level code of this package; workers must import it, not unpickle __main__.
    options.view_as(SetupOptions).save_main_session = False
    try:
        postgres = postgres_from_options(options)
    except ValueError as error:
        raise PreflightError(str(error)) from error
    check_postgres(postgres)
    plan = plan_from_options(options)
    _log.info("reading Kafka from %s", plan.kafka.start_offset)
    # Keeps the Java expansion service (and, for local runners, the Java worker inside it) alive for as
    # long as the job runs, not just while the graph is expanded.
    with SubprocessServer.cache_subprocesses(), beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, options, plan)


def main() -> int:
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print_options_help("python -m pipelines.streaming", __doc__, OPTION_CLASSES)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(sys.argv[1:])
    except PreflightError as exc:
        print(f"streaming: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
