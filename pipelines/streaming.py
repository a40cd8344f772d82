"""The streaming main job: Kafka (Debezium CDC and plain JSON) -> core transforms -> BigQuery, Redis, HTTP API.

    python -m pipelines.streaming --runner=DataflowRunner ...       # production (flex template: templates/)
    scripts/run-local                                               # this machine: Prism + the local stack

``build_pipeline`` is exposed for tests; ``run`` adds the preflight checks and the runner.
"""

from __future__ import annotations

import logging
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions
from apache_beam.utils.subprocess_server import SubprocessServer

from pipelines.core import CoreSettings, build_core
from pipelines.options import CoreOptions
from pipelines.outputs import SinkSettings, write_outputs
from pipelines.preflight import PreflightError, check_postgres
from transforms.content import PostgresContentLoader, PostgresContentLookup, ReadContentOnce, RefreshingContent
from transforms.kafka_source import KafkaReadSettings, ReadRawRecordsFromKafka

_LOG = logging.getLogger(__name__)


def build_pipeline(pipeline: beam.Pipeline, options: PipelineOptions) -> None:
    """Applies the whole streaming graph to ``pipeline``."""
    core_options = options.view_as(CoreOptions)
    settings = CoreSettings.from_options(options, streaming=True)
    dsn = core_options.postgres_dsn
    refresh = core_options.content_refresh_seconds
    # With the side input read once, the lookup's expiring cache is what brings content edits in.
    hit_ttl = refresh if refresh > 0 else 60.0
    lookup = (
        (lambda: PostgresContentLookup(dsn, hit_ttl_seconds=hit_ttl))
        if core_options.content_lookup == "postgres"
        else None
    )

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
    write_outputs(core, SinkSettings.from_options(options, window_seconds=settings.windows.window_seconds))


def run(argv: list[str] | None = None) -> None:
    options = PipelineOptions(argv)
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
