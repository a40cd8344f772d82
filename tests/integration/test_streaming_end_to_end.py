"""The streaming job end to end on Prism, with a restart in the middle of the stream (issue #5).

Two ways to stop the first run: an interrupt (Ctrl-C, a crash or a cancel: open windows are lost with the
job), and a drain (issue #18, item 3: what Dataflow does before a relaunch). A drain ends the reads, so the
watermark jumps to the end of time and every open window fires *partially filled*; the relaunch with
``--start_offset=resume`` must recompute those windows whole, so its later panes carry complete totals. Here
the drain is a bounded run: ``--kafka_max_read_seconds`` ends the Kafka read while the inserts go on, and the
content side input is read once, so the job's every source ends and it fires and flushes all it holds, as
Dataflow's drain does.

A third variant stops like the first and then deletes everything the job kept in Redis, as a Redis without
persistence loses it when it restarts (issue 17): the HTTP API must still get every event once, because the
HTTP sink's write-ahead intents live in BigQuery, and the windows the resume recomputes come back to Redis
exactly.

Events are inserted into PostgreSQL while the job runs (SPEC §3's awkward cases included: NULL and negative
durations, NULL users, NULL content, content created just before its events, content without a
length), flow through Debezium and Kafka into the job, and the job is stopped and restarted with
``--start_offset=resume`` while the inserts go on. Then the Redis buckets and top 10, the BigQuery rows and
the HTTP API's receipts must equal what PostgreSQL says, computed here in SQL, not with the pipeline's code:
nothing lost, nothing counted twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest
import redis

from devstack import audit
from devstack.audit import comparable, diff, ranked_buckets, redis_buckets
from devstack.config import REPO_ROOT, StackConfig
from devstack.run_local import pipeline_args
from tests.integration.external_api import ExternalApiClient
from transforms.sinks.redis_layout import RankingSettings, read_top_content

pytestmark = pytest.mark.integration

WINDOW_SECONDS = 10
LATENESS_SECONDS = 30
RATE = 20  # events per second
STOP_AFTER_SECONDS = 15  # of the first run's output
WRITE_AFTER_RESTART_SECONDS = 25
LATE_CONTENT_AFTER_SECONDS = 20
CONVERGE_SECONDS = 120
# The drained run's Kafka read ends after this long per partition: a bounded KafkaIO read is Beam's
# BoundedReadFromUnboundedSource, whose shards (one per partition) Prism reads one after another.
DRAIN_AFTER_READ_SECONDS = 10
DRAIN_SECONDS = 180  # for the drained run to fire its windows, flush its sinks and exit by itself


# --- what PostgreSQL says -----------------------------------------------------------------------------------

EVENTS_SQL = """
SELECT e.id, e.duration_ms, c.id IS NULL AS content_missing, c.length_seconds
FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id
WHERE e.id = ANY(%(ids)s)
"""


def ground_truth(conn, ids: list[int]) -> dict:
    return audit.ground_truth(conn, ids, WINDOW_SECONDS)


def expected_event_rows(conn, ids: list[int]) -> dict[int, tuple]:
    """id -> (engagement_seconds, engagement_pct, content_missing), by SPEC §3's rules written out here."""
    with conn.cursor() as cursor:
        cursor.execute(EVENTS_SQL, {"ids": ids})
        rows = cursor.fetchall()
    expected = {}
    for event_id, duration_ms, missing, length in rows:
        seconds = None if duration_ms is None or duration_ms < 0 else Decimal(duration_ms) / 1000
        pct = None
        if seconds is not None and length is not None and length > 0:
            pct = (seconds / length).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
        expected[event_id] = (seconds, pct, missing)
    return expected


# --- the stream ---------------------------------------------------------------------------------------------


class EventWriter(threading.Thread):
    """Inserts events at a steady rate, one autocommit transaction each, with SPEC §3's awkward cases."""

    def __init__(self, dsn: str, contents: list[str], rate: float, late_content_after: float) -> None:
        super().__init__(daemon=True)
        self.dsn, self.contents, self.rate = dsn, contents, rate
        self.late_content_after = late_content_after
        self.add_late_content = threading.Event()
        self.stopping = threading.Event()
        self.ids: list[int] = []
        self.late_content: str | None = None
        self.error: BaseException | None = None
        self.random = random.Random(20261122)

    def insert_content(self, cursor, length: int | None) -> str:
        content_id = str(uuid.uuid4())
        cursor.execute(
            "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
            " VALUES (%s, %s, %s, 'podcast', %s, now())",
            (content_id, f"e2e-{content_id}", f"E2E {content_id[:8]}", length),
        )
        return content_id

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        rng = self.random
        started = time.monotonic()
        count = 0
        with conn.cursor() as cursor:
            while not self.stopping.is_set():
                late = time.monotonic() - started > self.late_content_after or self.add_late_content.is_set()
                if self.late_content is None and late:
                    # SPEC §3: content created just before its events is enriched.
                    self.late_content = self.insert_content(cursor, 300)
                    self.contents.append(self.late_content)
                roll = rng.random()
                content = rng.choice(self.contents)
                if roll < 0.05:
                    content = None  # the foreign key makes NULL the only way to miss content in PostgreSQL
                duration = (
                    rng.choice([None, -500, 0, 1500, 45_000, 95_000, 400_000])
                    if rng.random() < 0.3
                    else rng.randrange(0, 120_000)
                )
                user = None if rng.random() < 0.05 else f"00000000-0000-4000-8000-{rng.randrange(40):012d}"
                event_type = rng.choice(["play", "pause", "finish", "click", None])
                # Event time a little before the commit, never after it (docs/restarts.md).
                event_ts = datetime.now(UTC) - timedelta(seconds=rng.uniform(0, 3))
                cursor.execute(
                    "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device,"
                    " raw_payload) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (content, user, event_type, event_ts, duration, rng.choice(["ios", None]),
                     json.dumps({"e2e": count}) if rng.random() < 0.9 else None),
                )  # fmt: skip
                self.ids.append(cursor.fetchone()[0])
                count += 1
                time.sleep(max(0.0, started + count / self.rate - time.monotonic()))
        conn.close()


# --- the job ------------------------------------------------------------------------------------------------


class StreamingJob:
    def __init__(self, args: list[str], log_path: Path, token: str) -> None:
        self.log_path = log_path
        log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.streaming", *args],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HTTP_API_TOKEN": token},
        )
        log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def job_args(cfg: StackConfig, dataset: str, prefix: str, group: str, start: datetime | None) -> list[str]:
    return [
        *pipeline_args(cfg, start, WINDOW_SECONDS, LATENESS_SECONDS),
        f"--consumer_group={group}",
        f"--bigquery_dataset={dataset}",
        f"--redis_key_prefix={prefix}",
        f"--dedup_horizon_seconds={WINDOW_SECONDS + LATENESS_SECONDS}",
        "--resume_margin_seconds=20",
    ]


def insert_content(dsn: str, title: str, content_type: str) -> str:
    """A content row of 60 seconds for a test's own events; returns its id."""
    content_id = str(uuid.uuid4())
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(
                "INSERT INTO content (id, slug, title, content_type, length_seconds, publish_ts)"
                " VALUES (%s, %s, %s, %s, 60, now())",
                (content_id, f"{title.lower()}-{content_id}", title, content_type),
            )
    finally:
        conn.close()
    return content_id


def bigquery_rows(bq, cfg: StackConfig, dataset: str, sql: str) -> list[dict]:
    return audit.bigquery_rows(bq, f"{cfg.bq_project}.{dataset}", sql)


def wait_for(description: str, check, timeout: float, jobs: list[StreamingJob], show=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for job in jobs:
            assert job.process.poll() is None, f"the job exited early:\n{job.log()[-4000:]}"
        time.sleep(1)
    logs = "".join(f"\n--- job log, last lines ---\n{job.log()[-3000:]}" for job in jobs)
    pytest.fail(f"timed out waiting for {description}" + (f":\n{show()}" if show else "") + logs)


@pytest.mark.parametrize("stop", ["interrupt", "drain", "redis_lost"])
def test_stream_with_a_restart_matches_postgres_exactly(private_api, dataset, bq, tmp_path, stop: str) -> None:
    cfg = private_api
    drain = stop == "drain"
    run_id = uuid.uuid4().hex[:10]
    prefix, group = f"e2e-{run_id}", f"e2e-{run_id}"
    api = ExternalApiClient(cfg)
    ranking = RankingSettings(window_seconds=WINDOW_SECONDS, horizon_minutes=10)
    cache = redis.Redis.from_url(cfg.redis_url)

    conn = psycopg2.connect(cfg.pg_dsn)
    conn.autocommit = True
    # A drained run reads content once: content created during it comes after the drain, which the relaunch sees.
    writer = EventWriter(cfg.pg_dsn, [], RATE, late_content_after=float("inf") if drain else LATE_CONTENT_AFTER_SECONDS)
    with conn.cursor() as cursor:
        writer.contents = [writer.insert_content(cursor, length) for length in (90, 1200, 3600, None, 600, 45)]

    started = datetime.now(UTC) - timedelta(seconds=2)
    first_args = job_args(cfg, dataset, prefix, group, started)
    if drain:
        first_args += [f"--kafka_max_read_seconds={DRAIN_AFTER_READ_SECONDS}", "--content_refresh_seconds=0"]
    first = StreamingJob(first_args, tmp_path / "first.log", cfg.http_api_token)
    drained: dict = {}
    second: StreamingJob | None = None
    try:
        writer.start()
        written = (
            "SELECT COUNT(*) AS n FROM `DATASET.enriched_events`"
            f" WHERE processed_at >= TIMESTAMP '{started.isoformat()}'"
        )
        wait_for("the first run's output", lambda: bigquery_rows(bq, cfg, dataset, written)[0]["n"] > 0, 150, [first])
        if drain:
            try:
                returncode = first.process.wait(timeout=DRAIN_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the drained run did not end by itself:\n{first.log()[-4000:]}")
            assert returncode == 0, first.log()[-4000:]
            # What the drain left in Redis, all windows fired: compared with the final truth below.
            drained = redis_buckets(cache, prefix, ground_truth(conn, list(writer.ids)))
        else:
            time.sleep(STOP_AFTER_SECONDS)
            first.stop()
            if stop == "redis_lost":
                # A Redis without persistence restarted while the job was down: everything the job kept
                # there is gone. The HTTP sink must still send each event once (its intents are in BigQuery).
                lost = list(cache.scan_iter(f"{prefix}:*"))
                assert lost, "the first run wrote nothing to Redis"
                cache.delete(*lost)
        assert writer.is_alive(), f"the writer stopped before the restart: {writer.error}"

        second = StreamingJob(job_args(cfg, dataset, prefix, group, None), tmp_path / "second.log", cfg.http_api_token)
        writer.add_late_content.set()
        time.sleep(WRITE_AFTER_RESTART_SECONDS)
        writer.stopping.set()
        writer.join(30)
        assert writer.error is None, writer.error
        ids = list(writer.ids)
        truth = ground_truth(conn, ids)
        expected_rows = expected_event_rows(conn, ids)
        id_list = ",".join(map(str, ids))

        def bigquery_complete() -> bool:
            rows = bigquery_rows(
                bq,
                cfg,
                dataset,
                f"SELECT COUNT(DISTINCT event_id) AS n FROM `DATASET.enriched_events` WHERE event_id IN ({id_list})",
            )
            return rows[0]["n"] == len(ids)

        def http_complete() -> bool:
            return all(count >= 1 for count in api.receipts(ids).values())

        def aggregates_complete() -> bool:
            return diff(current_aggregates(bq, cfg, dataset, truth), comparable(truth)) == ""

        if stop == "redis_lost":
            # Only the windows the resume recomputes come back to Redis; older ones need a backfill.
            read_from = datetime.fromisoformat(re.search(r"re-reading Kafka from (\S+),", second.log()).group(1))
            in_redis = {key: row for key, row in truth.items() if key[0] >= read_from}
            assert in_redis, "no window was recomputed"
        else:
            in_redis = truth

        def redis_complete() -> bool:
            return diff(redis_buckets(cache, prefix, in_redis), ranked_buckets(in_redis)) == ""

        for description, check, show in (
            ("every event in BigQuery", bigquery_complete, None),
            ("every event at the HTTP API", http_complete, None),
            (
                "the window aggregates to match PostgreSQL",
                aggregates_complete,
                lambda: diff(current_aggregates(bq, cfg, dataset, truth), comparable(truth)),
            ),
            (
                "the Redis buckets to match PostgreSQL",
                redis_complete,
                lambda: diff(redis_buckets(cache, prefix, in_redis), ranked_buckets(in_redis)),
            ),
        ):
            wait_for(description, check, CONVERGE_SECONDS, [second], show)

        # Exactly: each id once in the raw table (not only in the view), with SPEC §3's values.
        rows = bigquery_rows(
            bq, cfg, dataset,
            "SELECT event_id, engagement_seconds, engagement_pct, content_missing FROM `DATASET.enriched_events`"
            f" WHERE event_id IN ({id_list})",
        )  # fmt: skip
        assert sorted(row["event_id"] for row in rows) == sorted(ids)
        assert {
            row["event_id"]: (row["engagement_seconds"], row["engagement_pct"], row["content_missing"]) for row in rows
        } == expected_rows
        assert api.receipts(ids) == dict.fromkeys(ids, 1)
        assert diff(current_aggregates(bq, cfg, dataset, truth), comparable(truth)) == ""
        assert diff(redis_buckets(cache, prefix, in_redis), ranked_buckets(in_redis)) == ""

        # The top 10 ranks our content as PostgreSQL does; content of other writers (none in CI) may share it.
        top = read_top_content(cache, prefix, n=10, ranking=ranking)
        mine = {content_id for (_, content_id, missing) in truth if not missing}
        ours = [(entry.content_id, entry.engagement_seconds) for entry in top if entry.content_id in mine]
        expected = expected_top(in_redis, ranking)
        assert ours == expected[: len(ours)]
        assert len(ours) == min(len(expected), 10 - (len(top) - len(ours)))

        assert writer.late_content in {row["content_id"] for row in rows_for(truth, missing=False)}
        dead = bigquery_rows(
            bq, cfg, dataset, f"SELECT COUNT(*) AS n FROM `DATASET.dead_letters` WHERE event_id IN ({id_list})"
        )
        assert dead[0]["n"] == 0

        # The restart really overlapped: it resumed from the sinks and skipped events they already held.
        log = second.log()
        assert "resuming: the last run wrote events until" in log, log[-4000:]
        held = [int(n) for n in re.findall(r"resume: bigquery already holds (\d+) events", log)]
        assert held, log[-4000:]
        assert max(held) > 0, log[-4000:]
        held_by_http = [int(n) for n in re.findall(r"resume: http already holds (\d+) events", log)]
        assert held_by_http, log[-4000:]
        assert max(held_by_http) > 0, log[-4000:]
        assert re.search(r"resume: sending \d+ recorded batches", log), log[-4000:]
        if drain:
            # The drain really fired a window partially filled, and the relaunch's panes completed it.
            final = ranked_buckets(truth)
            partial = [key for key, (_, events) in drained.items() if events < final.get(key, (0, 0))[1]]
            assert partial, f"no window straddled the drain: {sorted(drained.items(), key=str)[-5:]}"
    finally:
        writer.stopping.set()
        first.stop()
        if second is not None:
            second.stop()
        conn.close()


# --- comparisons ----------------------------------------------------------------------------------------------


def current_aggregates(bq, cfg: StackConfig, dataset: str, truth: dict) -> dict:
    return audit.current_aggregates(bq, f"{cfg.bq_project}.{dataset}", truth)


def rows_for(truth: dict, missing: bool) -> list[dict]:
    return [row for (_, _, is_missing), row in truth.items() if is_missing == missing]


def expected_top(truth: dict, ranking: RankingSettings) -> list[tuple[str, Decimal]]:
    starts = set(ranking.bucket_starts(time.time()))
    totals: dict[str, Decimal] = {}
    for (window, content_id, missing), row in truth.items():
        if not missing and int(window.timestamp()) in starts:
            totals[content_id] = totals.get(content_id, Decimal(0)) + Decimal(row["engagement_seconds_sum"])
    ranked = sorted(totals.items(), key=lambda item: (item[1], item[0]), reverse=True)[:10]
    return [(content_id, total.quantize(Decimal("0.001"))) for content_id, total in ranked]
