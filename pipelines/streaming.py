"""The streaming main job: Kafka (Debezium CDC and plain JSON) -> core transforms -> BigQuery, Redis, HTTP API.

    python -m pipelines.streaming --runner=DataflowRunner ...       # production (flex template: templates/)
    scripts/run-local                                               # this machine: Prism + the local stack

``build_pipeline`` is exposed for tests; ``run`` adds the preflight checks and the runner.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from datetime import UTC, datetime, timedelta

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions
from apache_beam.utils.subprocess_server import SubprocessServer

from pipelines.core import CoreSettings, build_core
from pipelines.options import CoreOptions, with_state_cache
from pipelines.outputs import SinkSettings, write_outputs
from pipelines.preflight import PreflightError, check_postgres
from transforms.backfill_filters import BigQueryReadSettings
from transforms.content import PostgresContentLoader, PostgresContentLookup, ReadContentOnce, RefreshingContent
from transforms.kafka_source import KafkaReadOptions, KafkaReadSettings, ReadRawRecordsFromKafka
from transforms.resume import BigQueryIdsSince, BigQueryProgress, LedgerIdsSince, ResumeOptions, ResumePlan, plan_resume
from transforms.sinks.bigquery import BigQuerySinkOptions

_LOG = logging.getLogger(__name__)


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Applies the whole streaming graph to ``pipeline``."""
    core_options = options.view_as(CoreOptions)
    # run() forces --streaming; a bounded run (the FnApiRunner integration test) takes the bounded core, as the
    # BigQuery sink does, because the FnApiRunner cannot fire processing-time triggers.
    settings = CoreSettings.from_options(options, streaming=options.view_as(StandardOptions).streaming)
    dsn = core_options.postgres_dsn
    refresh = core_options.content_refresh_seconds
    # With the side input read once, the lookup's expiring cache is what brings content edits in.
    hit_ttl = refresh if refresh > 0 else 60.0
    lookup = (
        (lambda: PostgresContentLookup(dsn, hit_ttl_seconds=hit_ttl))
        if core_options.content_lookup == "postgres"
        else None
    )

    resume = resolve_resume(options, settings)
    if resume is not None:
        settings = resumed_settings(settings, resume, datetime.now(UTC))
    raw = pipeline | "Read Kafka" >> ReadRawRecordsFromKafka(KafkaReadSettings.from_options(options))
    if refresh > 0:
        content = pipeline | "Content snapshots" >> RefreshingContent(
            PostgresContentLoader(dsn), interval_seconds=refresh
        )
    else:
        # Prism cannot serve a triggered global-window side input (apache/beam#31438): read the table
        # once and let the point lookup cover what is created or edited later.
        content = pipeline | "Content snapshot" >> ReadContentOnce(PostgresContentLoader(dsn))
    core = build_core(raw, content, settings, content_lookup=lookup)
    sinks = SinkSettings.from_options(
        options,
        window_seconds=settings.windows.window_seconds,
        allowed_lateness_seconds=settings.windows.allowed_lateness_seconds,
    )
    if resume is not None:
        sinks = dataclasses.replace(
            sinks,
            bigquery_holds=BigQueryIdsSince(bigquery_read_settings(options), resume.read_from),
            http_holds=(
                LedgerIdsSince(sinks.http.ledger, sinks.http.ledger_redis_url, resume.read_from)
                if sinks.http is not None and sinks.http.ledger is not None
                else None
            ),
        )
    write_outputs(core, sinks)


def bigquery_read_settings(options: PipelineOptions) -> BigQueryReadSettings:
    bigquery = options.view_as(BigQuerySinkOptions)
    return BigQueryReadSettings(
        project=bigquery.bigquery_project,
        dataset=bigquery.bigquery_dataset,
        events_table=bigquery.bigquery_events_table,
        aggregates_table=bigquery.bigquery_aggregates_table,
        rest_endpoint=bigquery.bigquery_rest_endpoint,
    )


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
    _LOG.info(
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


def resolve_resume(options: PipelineOptions, settings: CoreSettings) -> ResumePlan | None:
    """Turns ``--start_offset=resume`` into a start time and a plan (transforms/resume.py), or None.

    The options are updated in place, so the Kafka read and the job's recorded options show the real start.
    """
    kafka = options.view_as(KafkaReadOptions)
    if kafka.start_offset != "resume":
        return None
    plan = plan_resume(
        BigQueryProgress(bigquery_read_settings(options)),
        settings.windows.window_seconds,
        settings.windows.allowed_lateness_seconds,
        options.view_as(ResumeOptions).resume_margin_seconds,
    )
    now = datetime.now(UTC)
    # Without a usable plan the job starts with the windows that are still open; older data is the backfill's.
    fresh_start = now - timedelta(seconds=settings.windows.open_seconds)
    max_gap = options.view_as(ResumeOptions).resume_max_gap_seconds
    if plan is None:
        _LOG.info("resume: enriched_events is empty (a first run); reading from %s", fresh_start.isoformat())
        kafka.start_offset = fresh_start.isoformat()
        return None
    if (now - plan.last_processed_at).total_seconds() > max_gap:
        _LOG.warning(
            "resume: the last run stopped at %s, more than --resume_max_gap_seconds=%d ago; reading from %s. "
            "Fill the gap with: scripts/backfill --start %s --end %s",
            plan.last_processed_at.isoformat(),
            max_gap,
            fresh_start.isoformat(),
            plan.read_from.isoformat(),
            fresh_start.isoformat(),
        )
        kafka.start_offset = fresh_start.isoformat()
        return None
    _LOG.info(plan.describe())
    kafka.start_offset = plan.read_from.isoformat()
    return plan


def run(argv: list[str] | None = None) -> None:
    options = PipelineOptions(with_state_cache(list(sys.argv[1:] if argv is None else argv)))
    options.view_as(StandardOptions).streaming = True
    # DoFns refer to module-level code of this package; workers must import it, not unpickle __main__.
    options.view_as(SetupOptions).save_main_session = False
    check_postgres(options.view_as(CoreOptions).postgres_dsn)
    # Keeps the Java expansion service (and, for local runners, the Java worker inside it) alive for as
    # long as the job runs, not just while the graph is expanded.
    with SubprocessServer.cache_subprocesses(), beam.Pipeline(options=options) as pipeline:
        build_pipeline(pipeline, options)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(sys.argv[1:])
    except PreflightError as exc:
        print(f"streaming: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
