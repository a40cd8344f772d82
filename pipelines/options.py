"""The options and settings of the transforms both the streaming job and the backfill run.

Every option here is also a parameter of the Dataflow flex template (templates/metadata.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.aggregate import WindowSettings
from transforms.decode import DecodeLimits
from transforms.postgres import PostgresDsn, dsn_has_password
from transforms.secrets import password_source_from
from transforms.settings import add_options, option_values, setting


class CoreOptions(PipelineOptions):
    """Options of the transforms both pipelines run: de-duplication, enrichment and windows."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--postgres_dsn",
            default="host=127.0.0.1 port=25432 dbname=engagement user=engagement password=engagement",
            help=(
                "libpq connection string of the PostgreSQL database holding the content table (e.g. with "
                "sslmode=verify-full for Cloud SQL). Without a password when the password comes from "
                "--postgres_password_secret or --postgres_password_file, as it must on Dataflow: the string "
                "travels in the job graph."
            ),
        )
        parser.add_argument(
            "--postgres_password_secret",
            help=(
                "Secret Manager secret version holding the PostgreSQL password "
                "(projects/PROJECT/secrets/NAME/versions/VERSION), read by each worker when it connects."
            ),
        )
        parser.add_argument(
            "--postgres_password_file",
            help="File holding the PostgreSQL password, read when connecting (local runs; not on Dataflow).",
        )
        add_options(parser, DecodeLimits, WindowSettings, CoreSettings)
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


@dataclass(frozen=True)
class CoreSettings:
    """What ``build_core`` needs: windows, de-duplication and decoding limits, validated together."""

    windows: WindowSettings = field(default_factory=WindowSettings)
    dedup_horizon_seconds: int = setting(
        600,
        flag="--dedup_horizon_seconds",
        type=int,
        help=(
            "How long an event id is remembered to drop redelivered copies, in seconds of event time past "
            "the first copy's event time. Must be at least window_seconds + allowed_lateness_seconds."
        ),
    )
    streaming: bool = True
    windows_from: datetime | None = None
    """A resumed job's re-read start: earlier windows were final before the restart (transforms/resume.py)."""
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    ids_unique_at_source: bool = False
    """True when the source cannot hold two records with one id: the backfill reads PostgreSQL, where ``id``
    is the primary key and the read splits are disjoint id ranges. The batch de-duplication, a GroupByKey
    that holds every event in the runner, is then skipped. A stream (Kafka redelivers) always de-duplicates."""
    event_lists: bool = False
    """True when the source emits lists of records (``LIST_ROWS`` rows each) and every step takes lists
    (``transforms/lists.py``): the backfill's reader. Bounded sources whose ids are unique only, since
    de-duplication needs one element per event (streaming makes its own lists after its de-duplication)."""
    coalesce_panes_seconds: int = 0
    """Streaming: also output the panes coalesced to one per window and content per this many seconds
    (``CoreOutputs.coalesced_aggregates``), for BigQuery's window_aggregates; the streaming job sets it from
    ``--bigquery_pane_interval_seconds``. 0: none."""

    def __post_init__(self) -> None:
        if self.streaming and self.ids_unique_at_source:
            raise ValueError("a stream can deliver an id twice: ids_unique_at_source is for bounded sources only")
        if self.coalesce_panes_seconds < 0:
            raise ValueError("coalesce_panes_seconds must not be negative")
        if self.event_lists and not self.ids_unique_at_source:
            raise ValueError("lists of events cannot be de-duplicated: event_lists needs ids_unique_at_source")
        if self.event_lists and self.windows_from is not None:
            raise ValueError("lists of events are for bounded runs, which resume nothing: no windows_from")
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
            windows=WindowSettings(**option_values(WindowSettings, core)),
            streaming=streaming,
            decode=DecodeLimits(**option_values(DecodeLimits, core)),
            **option_values(cls, core),
        )


STATE_CACHE_MB = 128
"""The SDK worker's state cache unless ``--max_cache_memory_usage_mb`` says otherwise.

Beam 2.73 turns the cache off by default (0), and then every read of a stateful DoFn's state (the de-dup
bitmaps, the pane totals, the local BigQuery writer's offsets) is a round trip to the runner, even twice in one
bundle. With a cache, a value read or written once in a bundle is served from memory for the rest of it, and
across bundles where the runner sends cache tokens: Dataflow does, and our patched Prism does
(devstack/prism-patches/0003). The state is small (16-byte bitmaps, one totals record per open window and
content), so 128 MB per worker is ample and far below a Dataflow worker's memory.
"""


def with_state_cache(argv: list[str]) -> list[str]:
    """``argv`` with the project's state cache size unless it sets one (``0`` turns the cache off)."""
    if any(arg == "--max_cache_memory_usage_mb" or arg.startswith("--max_cache_memory_usage_mb=") for arg in argv):
        return argv
    return [*argv, f"--max_cache_memory_usage_mb={STATE_CACHE_MB}"]


def postgres_from_options(options: PipelineOptions) -> PostgresDsn:
    """The PostgreSQL connection, its password kept out of the graph (``password_source_from``)."""
    core = options.view_as(CoreOptions)
    password = password_source_from(
        options,
        what="the PostgreSQL password",
        target_option="--postgres_dsn",
        target_has_password=dsn_has_password(core.postgres_dsn),
        secret_option="--postgres_password_secret",  # noqa: S106 - an option name
        secret=core.postgres_password_secret,
        file_option="--postgres_password_file",
        file_path=core.postgres_password_file,
    )
    return PostgresDsn(core.postgres_dsn, password)
