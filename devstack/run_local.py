"""``scripts/run-local``: the streaming job on this machine, end to end, with a live view.

Brings the local stack up, creates the BigQuery tables in the emulator, starts the data generator
(PostgreSQL -> Debezium -> Kafka), runs ``pipelines.streaming`` on Prism, and redraws the top 10 and the
sink counts every few seconds until Ctrl-C or SIGTERM (e.g. ``timeout 150 scripts/run-local``), either of
which stops the generator and the pipeline (the stack stays up; ``scripts/stack down`` stops it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis
import requests

from devstack import bigquery_clients
from devstack.cli import ensure_tables, ensure_up
from devstack.config import REPO_ROOT, StackConfig, load_config
from devstack.interrupts import stop_on_first_signal
from devstack.process import record_job, stop_job, stop_orphaned_jobs
from pipelines.local_runner import prism_args
from transforms.sinks.redis_layout import RedisKeys, read_freshness, read_top_content

CONSUMER_GROUP = "engagement-local"
CDC_TOPIC = "cdc.public.engagement_events"
PIPELINE_LOG = "pipeline.log"
GENERATOR_LOG = "generator.log"


def pipeline_args(cfg: StackConfig, start: datetime | None, window_seconds: int, lateness_seconds: int) -> list[str]:
    """The streaming job's options against the local stack, on Prism (see docs/local-streaming.md)."""
    return [
        *prism_args(streaming=True),
        f"--bootstrap_servers={cfg.kafka_bootstrap}",
        f"--cdc_topic={CDC_TOPIC}",
        f"--consumer_group={CONSUMER_GROUP}",
        f"--start_offset={start.isoformat() if start else 'resume'}",
        # Prism refuses KafkaIO's commit-in-finalize step (it needs stable input); the consumer commits.
        "--commit_offsets=false",
        "--kafka_consumer_config=enable.auto.commit=true",
        "--kafka_java_loopback_worker=true",
        f"--postgres_dsn={cfg.pg_dsn}",
        # Prism cannot refresh a side input (apache/beam#31438): snapshot once, look new content up.
        "--content_refresh_seconds=0",
        f"--window_seconds={window_seconds}",
        f"--allowed_lateness_seconds={lateness_seconds}",
        f"--bigquery_project={cfg.bq_project}",
        f"--bigquery_dataset={cfg.bq_dataset}",
        "--bigquery_write_method=local_storage_write",
        f"--bigquery_endpoint={cfg.bq_grpc_endpoint}",
        f"--bigquery_rest_endpoint={cfg.bq_rest_endpoint}",
        f"--redis_url={cfg.redis_url}",
        f"--http_api_url={cfg.http_api_url}/v1/events",
    ]


def start_logged(
    cfg: StackConfig, argv: list[str], log_name: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Starts ``argv`` in a session of its own, logged to ``log_name``; recorded so that, should this driver
    die without stopping it, the next run-local or scripts/stack stops what it left (stop_orphaned_jobs)."""
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    log = open(cfg.log_dir / log_name, "ab")  # noqa: SIM115 - handed to the child, closed when it ends
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    record_job(cfg, log_name, process.pid)
    return process


def _counts(cfg: StackConfig, bq) -> dict[str, str]:  # noqa: ANN001 - a google.cloud.bigquery.Client
    counts: dict[str, str] = {}
    dataset = f"`{cfg.bq_project}.{cfg.bq_dataset}"
    for label, table in (
        ("events", "enriched_events_unique"),
        ("aggregates", "window_aggregates"),
        ("dead letters", "dead_letters"),
    ):
        try:
            rows = list(bq.query_and_wait(f"SELECT COUNT(*) AS n FROM {dataset}.{table}`"))  # noqa: S608
            counts[f"BigQuery {label}"] = f"{rows[0]['n']:,}"
        except Exception as exc:  # noqa: BLE001 - the view keeps drawing whatever one source says
            counts[f"BigQuery {label}"] = f"? ({type(exc).__name__})"
    try:
        stats = requests.get(f"{cfg.http_api_url}/v1/stats", timeout=2).json()
        counts["HTTP API events"] = f"{stats['distinct_event_ids']:,} ({stats['batches_received']:,} batches)"
    except (requests.RequestException, KeyError, ValueError) as exc:
        counts["HTTP API events"] = f"? ({type(exc).__name__})"
    return counts


SINK_COUNTS_SECONDS = 10.0
"""How often the live view counts what the sinks hold. The BigQuery counts are full-table queries (the
``enriched_events_unique`` view de-duplicates every row): redrawn every 2 s they kept the local emulator at 0.15
of a core while the job itself idled at 0.02 (docs/benchmarks.md, session 17)."""


class SinkCounts:
    """The sinks' counts, taken again at most every ``every`` seconds; the view says how old they are."""

    def __init__(self, count: Callable[[], dict[str, str]], every: float = SINK_COUNTS_SECONDS) -> None:
        self._count = count
        self._every = every
        self._counts: dict[str, str] = {}
        self._taken_at: float | None = None

    def lines(self, now: float) -> list[str]:
        if self._taken_at is None or now - self._taken_at >= self._every:
            self._counts, self._taken_at = self._count(), now
        age = now - self._taken_at
        return [f"Sinks (counted {age:.0f}s ago, every {self._every:.0f}s):"] + [
            f"  {name:<20} {value}" for name, value in self._counts.items()
        ]


def freshness_line(client: redis.Redis, now_ms: int) -> str:
    """p50/p95 of commit -> Redis over the last minute, from the samples the Redis sink keeps."""
    samples = sorted(read_freshness(client, RedisKeys(), now_ms - 60_000))
    if not samples:
        return "no Redis writes in the last minute"

    def percentile(fraction: float) -> float:
        return samples[min(len(samples) - 1, int(fraction * len(samples)))] / 1000

    return f"p50 {percentile(0.5):.2f} s, p95 {percentile(0.95):.2f} s over {len(samples):,} pane writes"


class SchemaDriftWatch:
    """The job's schema-drift warnings (``transforms/decode.py``), read from its log as it grows: the latest
    line per column, so the view says which columns change records lack now."""

    MARKER = "schema drift: "
    _COLUMN = re.compile(r"column '([^']+)'")

    def __init__(self, log_path: Path) -> None:
        self._path = log_path
        # The log is appended to across runs: only this run's lines count.
        self._offset = log_path.stat().st_size if log_path.exists() else 0
        self._pending = b""
        self._latest: dict[str, str] = {}

    def lines(self) -> list[str]:
        try:
            with self._path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *complete, self._pending = (self._pending + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            at = line.find(self.MARKER)
            column = self._COLUMN.search(line, at) if at >= 0 else None
            if column is not None:
                self._latest[column.group(1)] = line[at + len(self.MARKER) :][:160]
        return [self._latest[column] for column in sorted(self._latest)]


class KafkaLag:
    """Records of the CDC topic the job has not consumed yet: newest offsets minus the group's committed ones."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Consumer

        # Never subscribes, so it reads the group's offsets without joining the group or moving them.
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": CONSUMER_GROUP})

    def records_behind(self) -> int | None:
        from confluent_kafka import TopicPartition

        topic = self._consumer.list_topics(CDC_TOPIC, timeout=2).topics.get(CDC_TOPIC)
        if topic is None or topic.error is not None:
            return None
        partitions = [TopicPartition(CDC_TOPIC, p) for p in topic.partitions]
        behind = 0
        for committed in self._consumer.committed(partitions, timeout=2):
            _, high = self._consumer.get_watermark_offsets(committed, timeout=2)
            behind += high - (committed.offset if committed.offset >= 0 else 0)
        return behind

    def close(self) -> None:
        self._consumer.close()


def _draw(
    cfg: StackConfig,
    client: redis.Redis,
    sinks: SinkCounts,
    lag: KafkaLag,
    drift: SchemaDriftWatch,
    started: float,
    pipeline: subprocess.Popen,
) -> None:
    now = datetime.now(UTC)
    lines = [
        f"engagement-pipeline, local run: {now:%H:%M:%S} UTC, up {time.monotonic() - started:,.0f}s"
        f"   (pipeline log: {cfg.log_dir / PIPELINE_LOG}; Ctrl-C stops)",
        "",
        "Top content, last 10 minutes (Redis):",
        f"  {'#':>2}  {'engagement s':>12}  {'events':>6}  title",
    ]
    try:
        top = read_top_content(client)
        lines += [
            f"  {e.rank:>2}  {e.engagement_seconds:>12,.1f}  {e.event_count:>6,}  {e.title or e.content_id}"
            for e in top
        ] or ["  (nothing yet: the first panes arrive a few seconds after the job starts)"]
    except redis.RedisError as exc:
        lines.append(f"  ? ({exc})")
    lines += ["", f"Freshness, commit -> Redis: {freshness_line(client, int(time.time() * 1000))}"]
    try:
        behind = lag.records_behind()
        lines.append(f"Kafka lag: {behind:,} records not yet consumed" if behind is not None else "Kafka lag: ?")
    except Exception as exc:  # noqa: BLE001 - the view keeps drawing whatever one source says
        lines.append(f"Kafka lag: ? ({type(exc).__name__})")
    drift_lines = drift.lines()
    lines.append("Schema drift: " + ("none seen" if not drift_lines else f"{len(drift_lines)} column(s)"))
    lines += [f"  {line}" for line in drift_lines]
    lines += ["", *sinks.lines(time.monotonic())]
    if pipeline.poll() is not None:
        lines += ["", f"THE PIPELINE EXITED with status {pipeline.returncode}; see {cfg.log_dir / PIPELINE_LOG}"]
    sys.stdout.write("\033[2J\033[H" + "\n".join(lines) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/run-local", description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="events per second the generator writes (default 200)")
    parser.add_argument("--awkward", type=float, default=0.05, help="share of SPEC's awkward cases (default 0.05)")
    parser.add_argument("--refresh", type=float, default=2.0, help="seconds between redraws of the live view")
    parser.add_argument("--window-seconds", type=int, default=60)
    parser.add_argument("--allowed-lateness-seconds", type=int, default=300)
    parser.add_argument("--no-generator", action="store_true", help="run the pipeline only; feed it yourself")
    args = parser.parse_args(argv)
    # SIGTERM takes Ctrl-C's path: the children run in sessions of their own, so only we can stop them.
    stop_on_first_signal()

    cfg = load_config()
    print("run-local: starting the local stack (the first time installs it: a few minutes)")
    # A run-local killed with SIGKILL leaves its job (Python, Prism, Java) running, reading Kafka and writing
    # the sinks beside the new one: stop it first.
    stop_orphaned_jobs(cfg)
    ensure_up(cfg)
    ensure_tables(cfg)
    # None: --start_offset=resume, so a second run-local picks up where the first stopped (docs/restarts.md).
    start = None
    python = sys.executable
    pipeline: subprocess.Popen | None = None
    generator: subprocess.Popen | None = None
    client: redis.Redis | None = None
    lag: KafkaLag | None = None
    drift = SchemaDriftWatch(cfg.log_dir / PIPELINE_LOG)
    try:
        pipeline = start_logged(
            cfg,
            [
                python,
                "-m",
                "pipelines.streaming",
                *pipeline_args(cfg, start, args.window_seconds, args.allowed_lateness_seconds),
            ],
            PIPELINE_LOG,
            env={"HTTP_API_TOKEN": cfg.http_api_token},
        )
        print(f"run-local: pipeline starting on Prism (log: {cfg.log_dir / PIPELINE_LOG})")
        if not args.no_generator:
            generator = start_logged(
                cfg,
                [
                    python,
                    "-m",
                    "devstack.generator",
                    "postgres",
                    f"--rate={args.rate}",
                    f"--awkward={args.awkward}",
                    f"--dsn={cfg.pg_dsn}",
                ],
                GENERATOR_LOG,
            )
            log = cfg.log_dir / GENERATOR_LOG
            print(f"run-local: generator writing {args.rate:g} events/s to PostgreSQL (log: {log})")

        client = redis.Redis.from_url(cfg.redis_url)
        bq = bigquery_clients.rest_client(cfg.bq_rest_endpoint, cfg.bq_project)
        sinks = SinkCounts(lambda: _counts(cfg, bq))
        lag = KafkaLag(cfg.kafka_bootstrap)
        started = time.monotonic()
        while True:
            _draw(cfg, client, sinks, lag, drift, started, pipeline)
            time.sleep(args.refresh)
    except KeyboardInterrupt:
        pass
    finally:
        if generator is not None:
            stop_job(cfg, generator, "the generator", GENERATOR_LOG, "run-local", timeout=20)
        if pipeline is not None:
            stop_job(cfg, pipeline, "the pipeline", PIPELINE_LOG, "run-local", timeout=20)
        if client is not None:
            client.close()
        if lag is not None:
            lag.close()
    print("run-local: stopped; the stack is still up (scripts/stack down stops it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
