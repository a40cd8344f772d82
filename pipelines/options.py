"""Pipeline options shared by the streaming job and the backfill.

Every option here is also a parameter of the Dataflow flex template (templates/metadata.json).
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


class CoreOptions(PipelineOptions):
    """Options of the transforms both pipelines run: de-duplication, enrichment and windows."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--postgres_dsn",
            default="host=127.0.0.1 port=55432 dbname=engagement user=engagement password=engagement",
            help="libpq connection string of the PostgreSQL database holding the content table.",
        )
        parser.add_argument(
            "--window_seconds",
            type=int,
            default=60,
            help="Length of the fixed event-time windows of the per-content aggregates, in seconds.",
        )
        parser.add_argument(
            "--allowed_lateness_seconds",
            type=int,
            default=300,
            help="How long after a window ends late events still correct its aggregates, in seconds.",
        )
        parser.add_argument(
            "--early_firing_seconds",
            type=int,
            default=1,
            help="Processing-time delay after which a window emits an early (partial) result, in whole seconds.",
        )
        parser.add_argument(
            "--dedup_horizon_seconds",
            type=int,
            default=600,
            help=(
                "How long an event id is remembered to drop redelivered copies, in seconds of event time past "
                "the first copy's event time. Must be at least window_seconds + allowed_lateness_seconds."
            ),
        )
        parser.add_argument(
            "--content_refresh_seconds",
            type=float,
            default=60.0,
            help=(
                "How often the streaming job re-reads the content table for enrichment, in seconds. 0 reads it "
                "once at start and relies on --content_lookup for later content (for runners such as Prism that "
                "cannot refresh a side input)."
            ),
        )
        parser.add_argument(
            "--content_lookup",
            default="postgres",
            choices=["postgres", "none"],
            help=(
                "Where to look up content missing from the refreshed snapshot: 'postgres' queries it by "
                "id (so content created just before its events is enriched), 'none' trusts the snapshot."
            ),
        )
