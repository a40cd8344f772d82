"""``scripts/benchmark-streaming``: throughput, commit-to-Redis latency and memory of the streaming job.

Starts ``pipelines.streaming`` on Prism exactly as ``scripts/run-local`` does, but with a Kafka consumer group,
a Redis key prefix and a BigQuery dataset of its own, reading the CDC topic from now on. Once a warm-up trickle
of events shows up in Redis, it drives ``devstack.generator`` (PostgreSQL -> Debezium -> Kafka) at increasing
rates, one step per rate, and watches the job's per-window event counts in Redis every ``--poll-seconds``.

Latency of an event is the time from its PostgreSQL COMMIT (the generator's commit log) to the first Redis
poll at which its (window, content) bucket counts it. Buckets hold counts, not ids, so the k-th event of a
bucket in id order is taken as visible once the bucket's count reaches k. The ranks come from PostgreSQL
itself: every row committed after the job started, whoever wrote it, so concurrent writers on the shared
stack shift the ranks instead of faking early visibility. A step "kept up" when, at its end, the events
committed but not yet visible amount to at most ``--max-lag-seconds`` of its rate and every one of its
events became visible. Peak memory is the RSS of the job's whole session (the Python launcher with its
LOOPBACK SDK worker, Prism, the Java expansion service with its loopback worker), sampled with psutil.

docs/benchmarks.md ("Streaming") describes the method and records the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg2
import redis

from devstack import bigquery_clients
from devstack.cli import ensure_tables, ensure_up
from devstack.config import StackConfig, load_config, use_instance
from devstack.cpu_usage import cpu_seconds_by_service, machine_cpu_seconds, session_usage
from devstack.interrupts import stop_on_first_signal
from devstack.process import stop_job
from devstack.run_local import pipeline_args, start_logged
from transforms.sinks.redis_layout import RedisKeys

PROGRAM = "benchmark-streaming"

PROGRESS_EVERY_SECONDS = 5.0
# Buckets keep changing until their window closes (end + allowed lateness); a little more covers the
# processing delay of the last late pane.
BUCKET_MARGIN_SECONDS = 120
BucketKey = tuple[int, str]
"""(window start in epoch seconds, content id): one member of one ``<prefix>:bucket:<start>:events`` ZSET."""


# --- Pure rules: ranks, visibility and per-step figures, testable without a stack ----------------------------


@dataclass(frozen=True)
class GroundTruth:
    """Every ranked row committed after the job started: id, window start and content (index into ``contents``).

    Rows with a NULL ``content_id`` are left out: the Redis sink never writes them (SPEC §3).
    """

    ids: np.ndarray
    windows: np.ndarray
    content_index: np.ndarray
    contents: list[str]


@dataclass(frozen=True)
class Ranked:
    """``GroundTruth`` sorted by (window, content, id), with each row's 1-based rank inside its bucket."""

    ids: np.ndarray
    windows: np.ndarray
    content_index: np.ndarray
    rank: np.ndarray
    group_starts: np.ndarray
    contents: list[str]

    def group_bounds(self) -> Iterator[tuple[int, int]]:
        ends = np.append(self.group_starts[1:], len(self.ids))
        yield from zip(self.group_starts.tolist(), ends.tolist(), strict=True)

    def bucket(self, row: int) -> BucketKey:
        return int(self.windows[row]), self.contents[int(self.content_index[row])]


def rank_in_buckets(truth: GroundTruth) -> Ranked:
    """Ranks rows by id inside each (window, content) bucket.

    Ids are handed out by the table's sequence just before each batch commits, so id order is commit order
    to within concurrent transactions, and Debezium publishes in commit order.
    """
    order = np.lexsort((truth.ids, truth.content_index, truth.windows))
    ids, windows, contents = truth.ids[order], truth.windows[order], truth.content_index[order]
    new_group = np.ones(len(ids), dtype=bool)
    new_group[1:] = (windows[1:] != windows[:-1]) | (contents[1:] != contents[:-1])
    group_starts = np.flatnonzero(new_group)
    group_of_row = np.cumsum(new_group) - 1
    rank = np.arange(len(ids)) - group_starts[group_of_row] + 1 if len(ids) else np.zeros(0, dtype=np.int64)
    return Ranked(ids, windows, contents, rank, group_starts, truth.contents)


def visible_at(
    ranked: Ranked, mine: np.ndarray, history: Mapping[BucketKey, tuple[Sequence[float], Sequence[int]]]
) -> np.ndarray:
    """When each of ``mine`` (event ids) first showed up in Redis; NaN if never (or not in ``ranked``).

    ``history[bucket]`` is the poll times at which the bucket's count grew and the counts it grew to; the
    event of rank k is visible at the first poll with a count of at least k.
    """
    sorted_mine = np.sort(mine)
    is_mine = np.isin(ranked.ids, sorted_mine)
    seen = np.full(len(ranked.ids), np.nan)
    for start, end in ranked.group_bounds():
        rows = start + np.flatnonzero(is_mine[start:end])
        if len(rows) == 0:
            continue
        times, counts = history.get(ranked.bucket(start), ((), ()))
        if not counts:
            continue
        at = np.searchsorted(np.asarray(counts), ranked.rank[rows], side="left")
        found = at < len(counts)
        seen[rows[found]] = np.asarray(times)[at[found]]
    mine_rows = np.flatnonzero(is_mine)
    by_id = np.argsort(ranked.ids[mine_rows])
    ids_of_mine, seen_of_mine = ranked.ids[mine_rows][by_id], seen[mine_rows][by_id]
    where = np.clip(np.searchsorted(ids_of_mine, mine), 0, max(len(ids_of_mine) - 1, 0))
    result = np.full(len(mine), np.nan)
    if len(ids_of_mine):
        present = ids_of_mine[where] == mine
        result[present] = seen_of_mine[where[present]]
    return result


def outstanding_at(committed: np.ndarray, visible: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """How many events were committed but not yet visible at each of ``moments`` (never-visible count too)."""
    sorted_committed = np.sort(committed)
    sorted_visible = np.sort(np.where(np.isnan(visible), np.inf, visible))
    return np.searchsorted(sorted_committed, moments, side="right") - np.searchsorted(
        sorted_visible, moments, side="right"
    )


@dataclass(frozen=True)
class StepFigures:
    """One rate step's results."""

    target_rate: float
    events: int
    committed_rate: float
    visible_rate: float
    p50: float
    p95: float
    p99: float
    max_latency: float
    unseen: int
    backlog_end: int
    backlog_max: int
    lag_end_seconds: float
    backlog_growth_rate: float
    """Events/s by which the backlog grew over the step's second half (negative: it shrank)."""
    kept_up: bool
    pipeline_cores: float | None = None
    machine_busy: float | None = None
    peak_rss: int | None = None


def step_figures(
    target_rate: float,
    step_committed: np.ndarray,
    step_visible: np.ndarray,
    all_committed: np.ndarray,
    all_visible: np.ndarray,
    max_backlog_growth: float,
) -> StepFigures:
    """Latency percentiles of one step's events, and whether the job kept up with them.

    Throughput is measured over the step's commit span, from every measured event (a backlog of the previous
    step that drains here counts here); the backlog is sampled once a second over the same span.

    A step kept up when every one of its events became visible and its backlog did not grow by more than
    ``max_backlog_growth`` of the commit rate over the step's second half. Not the backlog's size: in a steady
    state it is the commit rate times the latency, which the percentiles already report.
    """
    first, last = float(step_committed.min()), float(step_committed.max())
    span = max(last - first, 1e-9)
    latency = step_visible - step_committed
    seen = latency[~np.isnan(latency)]
    p50, p95, p99 = (float(v) for v in np.percentile(seen, [50, 95, 99])) if len(seen) else (np.nan,) * 3
    in_span = (all_visible >= first) & (all_visible <= last)
    committed_rate = len(step_committed) / span
    backlog = outstanding_at(all_committed, all_visible, np.append(np.arange(first, last, 1.0), last))
    backlog_end = int(backlog[-1])
    lag_end = backlog_end / committed_rate
    growth_rate = backlog_growth_rate(backlog)
    unseen = int(np.isnan(step_visible).sum())
    return StepFigures(
        target_rate=target_rate,
        events=len(step_committed),
        committed_rate=committed_rate,
        visible_rate=float(in_span.sum()) / span,
        p50=p50,
        p95=p95,
        p99=p99,
        max_latency=float(seen.max()) if len(seen) else np.nan,
        unseen=unseen,
        backlog_end=backlog_end,
        backlog_max=int(backlog.max()),
        lag_end_seconds=lag_end,
        backlog_growth_rate=growth_rate,
        kept_up=unseen == 0 and growth_rate <= max_backlog_growth * committed_rate,
    )


def backlog_growth_rate(backlog: np.ndarray) -> float:
    """Events/s by which a backlog sampled once a second grew from the step's second quarter to its last.

    Quarter means, not two samples: Redis counts move in steps (the early trigger fires every second), so one
    sample can be a second's worth of events off.
    """
    quarter = len(backlog) // 4
    if quarter < 1:
        return float("nan")
    second, last = backlog[quarter : 2 * quarter], backlog[len(backlog) - quarter :]
    seconds_apart = (len(backlog) - quarter) - quarter  # from the second quarter's start to the last's
    return float(last.mean() - second.mean()) / seconds_apart


def _fmt(value: float | None, pattern: str) -> str:
    width = int(pattern.split(".")[0])
    return f"{'-':>{width}}" if value is None or np.isnan(value) else format(value, pattern)


def format_table(figures: Sequence[StepFigures]) -> str:
    header = (
        f"{'target/s':>8} {'events':>8} {'commit/s':>8} {'visible/s':>9} {'p50 s':>6} {'p95 s':>6} "
        f"{'p99 s':>6} {'max s':>6} {'unseen':>6} {'backlog end/max':>15} {'lag s':>6} {'growth/s':>8} "
        f"{'kept up':>7} "
        f"{'job cores':>9} {'machine busy':>12} {'peak RSS':>9}"
    )
    lines = [header]
    for f in figures:
        rss = "-" if f.peak_rss is None else f"{f.peak_rss / 2**20:,.0f} MiB"
        busy = "-" if f.machine_busy is None else f"{f.machine_busy:.0%}"
        lines.append(
            f"{f.target_rate:>8,.0f} {f.events:>8,} {f.committed_rate:>8,.0f} {f.visible_rate:>9,.0f} "
            f"{_fmt(f.p50, '6.2f')} {_fmt(f.p95, '6.2f')} {_fmt(f.p99, '6.2f')} {_fmt(f.max_latency, '6.2f')} "
            f"{f.unseen:>6,} {f'{f.backlog_end:,}/{f.backlog_max:,}':>15} {f.lag_end_seconds:>6.2f} "
            f"{_fmt(f.backlog_growth_rate, '8.0f')} {'yes' if f.kept_up else 'NO':>7} "
            f"{_fmt(f.pipeline_cores, '9.2f')} {busy:>12} {rss:>9}"
        )
    return "\n".join(lines)


def target_verdicts(figures: Sequence[StepFigures]) -> list[str]:
    """Issue 15's targets, each met, missed (by the figure that misses it) or not measured by these steps."""

    def step(rate: float) -> StepFigures | None:
        return next((f for f in figures if f.target_rate == rate), None)

    verdicts = []
    at_1000 = step(1000)
    if at_1000 is None:
        verdicts.append("p95 commit->Redis <= 2 s at 1,000/s: not measured (no 1,000/s step)")
    else:
        met = at_1000.kept_up and at_1000.p95 <= 2.0
        kept = "" if at_1000.kept_up else ", did not keep up"
        verdicts.append(
            f"p95 commit->Redis <= 2 s at 1,000/s: {'met' if met else 'not met'} (p95 {at_1000.p95:.2f} s{kept})"
        )
    fast = [f for f in figures if f.kept_up and f.committed_rate >= 3000 * 0.98]
    best = max((f for f in figures if f.kept_up), key=lambda f: f.committed_rate, default=None)
    if any(f.p95 <= 5.0 for f in fast):
        verdicts.append("3,000/s sustained with p95 <= 5 s: met")
    elif best is None:
        verdicts.append("3,000/s sustained with p95 <= 5 s: not met (no step kept up)")
    else:
        verdicts.append(
            f"3,000/s sustained with p95 <= 5 s: not met (highest kept up {best.committed_rate:,.0f}/s, "
            f"p95 {best.p95:.2f} s)"
        )
    at_100 = step(100)
    if at_100 is None or at_100.pipeline_cores is None:
        verdicts.append("job <= 0.3 of a core at 100/s: not measured")
    else:
        met = at_100.pipeline_cores <= 0.3
        verdicts.append(
            f"job <= 0.3 of a core at 100/s: {'met' if met else 'not met'} ({at_100.pipeline_cores:.2f} cores)"
        )
    return verdicts


def summary_line(figures: Sequence[StepFigures], peak_rss: int, breakdown: Mapping[str, int]) -> str:
    parts = ", ".join(f"{name} {rss / 2**20:,.0f}" for name, rss in sorted(breakdown.items()))
    memory = f"peak RSS {peak_rss / 2**20:,.0f} MiB ({parts})"
    kept = [f for f in figures if f.kept_up]
    if not kept:
        return f"benchmark-streaming: the job kept up with no step; {memory}"
    best = max(kept, key=lambda f: f.committed_rate)
    return (
        f"benchmark-streaming: sustained {best.committed_rate:,.0f} events/s (step {best.target_rate:,.0f}/s, "
        f"{best.visible_rate:,.0f} visible/s), commit->Redis p50 {best.p50:.2f} s, p95 {best.p95:.2f} s, "
        f"p99 {best.p99:.2f} s; {memory}"
    )


# --- Observation: Redis buckets and the job's processes -------------------------------------------------------


class BucketWatcher(threading.Thread):
    """Polls the open windows' event-count buckets and records when each (window, content) count grew.

    One pipelined ZRANGE per open window per poll; the poll's time is taken after the reply, so a latency is
    over-estimated by at most one poll interval plus a round trip, never under-estimated.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: RedisKeys,
        window_seconds: int,
        first_window: int,
        open_seconds: int,
        interval: float,
    ) -> None:
        super().__init__(name="bucket-watcher", daemon=True)
        self._client = client
        self._keys = keys
        self._window = window_seconds
        self._first_window = first_window
        self._open_seconds = open_seconds + BUCKET_MARGIN_SECONDS
        self._interval = interval
        self._lock = threading.Lock()
        self._latest: dict[BucketKey, int] = {}
        self._history: dict[BucketKey, tuple[list[float], list[int]]] = {}
        self._reported: dict[BucketKey, int] = {}
        self._stopping = threading.Event()
        self.polls = 0
        self.errors = 0
        # Accumulated counts only grow; a lower count overwriting a higher one means the job lost a window's
        # running total (first few kept as examples: poll time, bucket, highest count, new count).
        self.regressions: list[tuple[float, BucketKey, int, int]] = []
        self.regression_count = 0

    def _window_starts(self, now: float) -> range:
        current = int(now // self._window) * self._window
        oldest = max(self._first_window, current - self._open_seconds)
        oldest -= (oldest - self._first_window) % self._window
        return range(oldest, current + self._window, self._window)

    def poll_once(self) -> None:
        starts = self._window_starts(time.time())
        pipe = self._client.pipeline(transaction=False)
        for start in starts:
            pipe.zrange(self._keys.bucket_events(start), 0, -1, withscores=True)
        replies = pipe.execute()
        seen = time.time()
        with self._lock:
            for start, members in zip(starts, replies, strict=True):
                for member, score in members:
                    key = (start, member.decode())
                    count = int(score)
                    highest = self._latest.get(key, 0)
                    if count < highest and self._reported.get(key) != count:
                        self._reported[key] = count
                        self.regression_count += 1
                        if len(self.regressions) < 5:
                            self.regressions.append((seen, key, highest, count))
                    if count > highest:
                        self._latest[key] = count
                        times, counts = self._history.setdefault(key, ([], []))
                        times.append(seen)
                        counts.append(count)
            self.polls += 1

    def run(self) -> None:
        next_poll = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.poll_once()
            except redis.RedisError:
                self.errors += 1
            next_poll += self._interval
            self._stopping.wait(max(0.0, next_poll - time.monotonic()))

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def total(self) -> int:
        with self._lock:
            return sum(self._latest.values())

    def counts(self) -> dict[BucketKey, int]:
        with self._lock:
            return dict(self._latest)

    def history(self) -> dict[BucketKey, tuple[list[float], list[int]]]:
        with self._lock:
            return {key: (list(times), list(counts)) for key, (times, counts) in self._history.items()}


@dataclass
class Sample:
    at: float
    rss: int
    job_cpu_seconds: float
    machine_busy_seconds: float
    machine_total_seconds: float
    cpu_by_service: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each stack service and job part (devstack.cpu_usage)."""
    rss_by_process: dict[str, int] = field(default_factory=dict)
    """RSS of the job's processes by command name (python, prism, java)."""
    redis_used_memory: int | None = None
    """Redis's ``used_memory`` (the whole server: the buckets and rankings), every few samples."""


def memory_trend(samples: Sequence[Sample], first: float, last: float, rows: int = 7) -> list[str]:
    """RSS per job process and Redis's memory between two wall-clock times: ``rows`` points in time, then each
    one's least-squares slope in MiB per hour over the second half (caches and JIT warm up in the first; a
    bounded state shows a slope near 0 after that)."""
    inside = [s for s in samples if first <= s.at <= last]
    if len(inside) < 2:
        return []
    names = sorted({name for s in inside for name in s.rss_by_process})
    series: dict[str, list[tuple[float, float]]] = {
        name: [(s.at, s.rss_by_process[name] / 2**20) for s in inside if name in s.rss_by_process] for name in names
    }
    series["redis"] = [(s.at, s.redis_used_memory / 2**20) for s in inside if s.redis_used_memory is not None]
    series = {name: points for name, points in series.items() if len(points) >= 2}
    columns = list(series)
    lines = ["memory (MiB)  " + "".join(f"{name:>10}" for name in columns)]
    for index in range(rows):
        at = first + (last - first) * index / max(rows - 1, 1)
        cells = []
        for name in columns:
            _, nearest = min(series[name], key=lambda point: abs(point[0] - at))
            cells.append(f"{nearest:>10,.0f}")
        lines.append(f"  {at - first:>8,.0f}s  " + "".join(cells))
    slopes = []
    warm = first + (last - first) / 2
    for name in columns:
        points = [(at - first, value) for at, value in series[name] if at >= warm]
        times = [at for at, _ in points]
        values = [value for _, value in points]
        slope = statistics.linear_regression(times, values).slope if len(set(times)) > 1 else 0.0
        slopes.append(f"{slope * 3600:>+10,.1f}")
    lines.append("  MiB/hour  " + "".join(slopes) + "   (least squares over the second half: the state once warm)")
    return lines


class ProcessSampler(threading.Thread):
    """Samples the job's RSS and CPU time, and the machine's CPU, every ``interval`` seconds."""

    REDIS_EVERY = 20
    """Redis's memory is read every 20th sample (10 s): INFO is cheap, but not free on a busy server."""

    def __init__(self, session: int, interval: float = 0.5, redis_client: redis.Redis | None = None) -> None:
        super().__init__(name="process-sampler", daemon=True)
        self._session = session
        self._interval = interval
        self._redis = redis_client
        self._stopping = threading.Event()
        self.samples: list[Sample] = []
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}

    def run(self) -> None:
        while not self._stopping.is_set():
            rss, by_name, cpu = session_usage(self._session)
            busy, total = machine_cpu_seconds()
            used = None
            if self._redis is not None and len(self.samples) % self.REDIS_EVERY == 0:
                with contextlib.suppress(redis.RedisError):
                    used = int(self._redis.info("memory")["used_memory"])
            self.samples.append(
                Sample(time.time(), rss, cpu, busy, total, cpu_seconds_by_service(), dict(by_name), used)
            )
            if rss > self.peak:
                self.peak, self.peak_breakdown = rss, by_name
            self._stopping.wait(self._interval)

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)
        if self._redis is not None:
            self._redis.close()

    def over(self, first: float, last: float) -> tuple[float | None, float | None, int | None]:
        """(job cores, machine busy share, peak RSS) between two wall-clock times."""
        inside = [s for s in self.samples if first <= s.at <= last]
        if len(inside) < 2:
            return None, None, None
        a, b = inside[0], inside[-1]
        cores = (b.job_cpu_seconds - a.job_cpu_seconds) / (b.at - a.at)
        busy = (b.machine_busy_seconds - a.machine_busy_seconds) / max(
            1e-9, b.machine_total_seconds - a.machine_total_seconds
        )
        return cores, busy, max(s.rss for s in inside)

    def cores_by_service(self, first: float, last: float) -> dict[str, float]:
        """Cores each stack service and job part used between two wall-clock times, busiest first."""
        inside = [s for s in self.samples if first <= s.at <= last]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        cores = {
            name: (seconds - a.cpu_by_service.get(name, 0.0)) / (b.at - a.at)
            for name, seconds in b.cpu_by_service.items()
        }
        return dict(sorted(((n, c) for n, c in cores.items() if c >= 0.01), key=lambda item: -item[1]))


# --- The run: job, warm-up, steps, drain -----------------------------------------------------------------------


@dataclass
class StepRun:
    """One generator run: its files, and the commit time of every event it wrote once read back."""

    rate: float
    seconds: float
    directory: Path
    process: subprocess.Popen | None = None
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    committed: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def manifest(self) -> Path:
        return self.directory / f"manifest-{self.rate:g}.jsonl"

    @property
    def commit_log(self) -> Path:
        return self.directory / f"commits-{self.rate:g}.jsonl"

    def load(self) -> None:
        """Joins the manifest (event id -> batch) with the commit log (batch -> COMMIT time)."""
        committed_at = {}
        with self.commit_log.open() as lines:
            for line in lines:
                entry = json.loads(line)
                committed_at[entry["batch"]] = entry["committed_at"]
        ids, times = [], []
        with self.manifest.open() as lines:
            for line in lines:
                entry = json.loads(line)
                if entry.get("type") == "event" and entry["id"] is not None and entry["batch"] in committed_at:
                    ids.append(entry["id"])
                    times.append(committed_at[entry["batch"]])
        self.ids, self.committed = np.asarray(ids, dtype=np.int64), np.asarray(times)


def generator_argv(
    cfg: StackConfig, rate: float, seconds: float | None, manifest: Path | None, commits: Path | None
) -> list[str]:
    """``devstack.generator`` in postgres mode with no awkward cases: every event is ranked, so counted in Redis."""
    argv = [sys.executable, "-m", "devstack.generator", "postgres", f"--rate={rate:g}", "--awkward=0", "--quiet"]
    argv.append(f"--dsn={cfg.pg_dsn}")
    if seconds is not None:
        argv.append(f"--duration={seconds:g}")
    if manifest is not None:
        argv.append(f"--manifest={manifest}")
    if commits is not None:
        argv.append(f"--commit-log={commits}")
    return argv


def sequence_value(dsn: str) -> int:
    """The last id the events' sequence handed out: every row committed later has a larger id."""
    with contextlib.closing(psycopg2.connect(dsn)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('engagement_events', 'id')::regclass), 0)"
        )
        return int(cursor.fetchone()[0])


def read_ground_truth(dsn: str, after_id: int, up_to_id: int, window_seconds: int) -> GroundTruth:
    """Every ranked row with an id in (after_id, up_to_id], with its event-time window."""
    ids: list[int] = []
    windows: list[int] = []
    content_index: list[int] = []
    index: dict[str, int] = {}
    with contextlib.closing(psycopg2.connect(dsn)) as connection, connection.cursor("benchmark_truth") as cursor:
        cursor.itersize = 50_000
        cursor.execute(
            "SELECT id, content_id::text, floor(extract(epoch FROM event_ts) / %s)::bigint * %s "
            "FROM engagement_events WHERE id > %s AND id <= %s AND content_id IS NOT NULL",
            (window_seconds, window_seconds, after_id, up_to_id),
        )
        for event_id, content_id, window in cursor:
            ids.append(event_id)
            windows.append(window)
            content_index.append(index.setdefault(content_id, len(index)))
    return GroundTruth(
        np.asarray(ids, dtype=np.int64),
        np.asarray(windows, dtype=np.int64),
        np.asarray(content_index, dtype=np.int64),
        list(index),
    )


def last_needed_counts(ranked: Ranked, mine: np.ndarray) -> dict[BucketKey, int]:
    """Per bucket, the count at which the last of ``mine`` in it is visible: the drain is over when all are."""
    needed: dict[BucketKey, int] = {}
    is_mine = np.isin(ranked.ids, mine)
    for start, end in ranked.group_bounds():
        rows = np.flatnonzero(is_mine[start:end])
        if len(rows):
            needed[ranked.bucket(start)] = int(ranked.rank[start + rows[-1]])
    return needed


def parse_rates(text: str) -> list[float]:
    rates = [float(part) for part in text.split(",") if part.strip()]
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return rates


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/benchmark-streaming",
        description="Throughput, PostgreSQL-commit -> Redis latency and peak memory of the streaming job.",
        epilog="Everything after -- is passed to pipelines.streaming (e.g. -- --http_api_sink=disabled).",
    )
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=[100, 1000, 3000, 5000],
        help="events/s of each step, comma-separated (default 100,1000,3000,5000: the SPEC and issue targets)",
    )
    parser.add_argument("--step-seconds", type=float, default=60, help="how long each rate is held (default 60)")
    parser.add_argument("--warmup-rate", type=float, default=20, help="events/s before the steps (default 20)")
    parser.add_argument("--settle-seconds", type=float, default=15, help="warm-up after the first output (default 15)")
    parser.add_argument(
        "--startup-timeout", type=float, default=300, help="longest wait for the first output (default 300)"
    )
    parser.add_argument("--drain-seconds", type=float, default=60, help="longest wait for the last events (default 60)")
    parser.add_argument("--poll-seconds", type=float, default=0.1, help="interval of the Redis polls (default 0.1)")
    parser.add_argument(
        "--max-backlog-growth",
        type=float,
        default=0.05,
        help="how fast, as a fraction of its commit rate, a step's backlog may grow over the step's second half "
        "and still count as kept up (default 0.05)",
    )
    parser.add_argument("--window-seconds", type=int, default=60, help="the job's window length (default 60)")
    parser.add_argument(
        "--allowed-lateness-seconds", type=int, default=300, help="the job's allowed lateness (default 300)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the BigQuery dataset, Redis keys and logs")
    parser.add_argument("pipeline_args", nargs="*", help=argparse.SUPPRESS)
    return parser


@dataclass
class Resources:
    """What one run creates on the shared stack, named after its id so nothing collides with anyone else."""

    cfg: StackConfig
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    kind: str = "bench-stream"

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.run_id}"

    @property
    def dataset(self) -> str:
        return self.name.replace("-", "_")

    @property
    def stack(self) -> StackConfig:
        return dataclasses.replace(self.cfg, bq_dataset=self.dataset)

    def create(self) -> None:
        ensure_tables(self.cfg, self.dataset)

    def remove(self, client: redis.Redis) -> None:
        """Drops the dataset, this run's Redis keys and its consumer group; best effort, each on its own."""
        with contextlib.suppress(Exception):
            bq = bigquery_clients.rest_client(self.cfg.bq_rest_endpoint, self.cfg.bq_project)
            bq.delete_dataset(f"{self.cfg.bq_project}.{self.dataset}", delete_contents=True, not_found_ok=True)
        with contextlib.suppress(redis.RedisError):
            keys = list(client.scan_iter(match=f"{self.name}:*", count=1000))
            for first in range(0, len(keys), 500):
                client.delete(*keys[first : first + 500])
        with contextlib.suppress(Exception):
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": self.cfg.kafka_bootstrap})
            for future in admin.delete_consumer_groups([self.name], request_timeout=10).values():
                future.result(timeout=15)


class BenchmarkError(RuntimeError):
    """The job or a generator died, or the job never produced output: no figures to report."""


def _check(pipeline: subprocess.Popen, log: Path) -> None:
    if pipeline.poll() is not None:
        raise BenchmarkError(f"the streaming job exited with status {pipeline.returncode}; see {log}")


def _progress(label: str, started: float, watcher: BucketWatcher, sampler: ProcessSampler, previous: list) -> None:
    """One line: elapsed time, events the job made visible per second since the last line, memory."""
    now, total = time.time(), watcher.total()
    last_at, last_total = previous or (now, total)
    rate = (total - last_total) / max(now - last_at, 1e-9) if previous else 0.0
    previous[:] = [now, total]
    rss = sampler.samples[-1].rss if sampler.samples else 0
    print(
        f"benchmark-streaming: [{label}] {now - started:6.0f}s  Redis counts {total:>10,}  (+{rate:,.0f}/s)  "
        f"job RSS {rss / 2**20:,.0f} MiB",
        file=sys.stderr,
        flush=True,
    )


def _warnings(watcher: BucketWatcher, truth: GroundTruth, window_seconds: int) -> None:
    """What makes this run's figures suspect: lost running totals, and far-future events from other writers."""
    if watcher.regression_count:
        examples = "; ".join(
            f"{datetime.fromtimestamp(at, UTC):%H:%M:%S} bucket {start} {content[:8]} {high} -> {low}"
            for at, (start, content), high, low in watcher.regressions
        )
        print(
            f"WARNING: {watcher.regression_count:,} times a bucket's count went down (the job lost a window's "
            f"running total; latencies after that are not trustworthy), e.g. {examples}"
        )
    future = int((truth.windows > time.time() + window_seconds).sum())
    if future:
        print(
            f"WARNING: {future:,} rows committed during the run have an event_ts in the future (written by "
            "another user of the shared stack); they can move event time forward for the whole job"
        )


def run_benchmark(args: argparse.Namespace) -> int:
    # The benchmarks' own stack: their load, rows and requests never reach the one scripts/run-local shows.
    use_instance("bench")
    cfg = load_config()
    print("benchmark-streaming: starting the local stack (idempotent)", file=sys.stderr)
    ensure_up(cfg)
    resources = Resources(cfg)
    resources.create()
    directory = Path(tempfile.mkdtemp(prefix=f"{resources.name}-"))
    log_name = f"{resources.name}.log"
    log = cfg.log_dir / log_name
    client = redis.Redis.from_url(cfg.redis_url)
    window = args.window_seconds

    floor_id = sequence_value(cfg.pg_dsn)
    start = datetime.now(UTC)
    argv = [
        sys.executable,
        "-m",
        "pipelines.streaming",
        *pipeline_args(resources.stack, start, window, args.allowed_lateness_seconds),
        f"--consumer_group={resources.name}",
        f"--redis_key_prefix={resources.name}",
        *args.pipeline_args,
    ]
    steps = [StepRun(rate, args.step_seconds, directory) for rate in args.rates]
    pipeline: subprocess.Popen | None = None
    warmup: subprocess.Popen | None = None
    watcher: BucketWatcher | None = None
    sampler: ProcessSampler | None = None
    exit_status = 0
    try:
        pipeline = start_logged(resources.stack, argv, log_name, env={"HTTP_API_TOKEN": cfg.http_api_token})
        print(f"benchmark-streaming: job {resources.name} starting on Prism (log {log})", file=sys.stderr)
        sampler = ProcessSampler(pipeline.pid, redis_client=redis.Redis.from_url(cfg.redis_url))
        sampler.start()
        first_window = int(start.timestamp()) // window * window
        watcher = BucketWatcher(
            client,
            RedisKeys(resources.name),
            window,
            first_window,
            window + args.allowed_lateness_seconds,
            args.poll_seconds,
        )
        watcher.start()
        begun = time.time()
        previous: list = []

        warmup = start_logged(
            cfg, generator_argv(cfg, args.warmup_rate, None, None, None), f"{resources.name}-warmup.log"
        )
        deadline = time.monotonic() + args.startup_timeout
        last_line = 0.0
        while watcher.total() == 0:
            _check(pipeline, log)
            if time.monotonic() > deadline:
                raise BenchmarkError(f"no output in Redis after {args.startup_timeout:g}s; see {log}")
            if time.monotonic() - last_line >= PROGRESS_EVERY_SECONDS:
                _progress("waiting for first output", begun, watcher, sampler, previous)
                last_line = time.monotonic()
            time.sleep(0.2)
        print(f"benchmark-streaming: first output after {time.time() - begun:.1f}s", file=sys.stderr)
        settle_until = time.monotonic() + args.settle_seconds
        while time.monotonic() < settle_until:
            _check(pipeline, log)
            time.sleep(0.2)
        stop_job(cfg, warmup, "the warm-up generator", f"{resources.name}-warmup.log", PROGRAM)

        for step in steps:
            print(f"benchmark-streaming: step {step.rate:g} events/s for {step.seconds:g}s", file=sys.stderr)
            step.process = start_logged(
                cfg,
                generator_argv(cfg, step.rate, step.seconds, step.manifest, step.commit_log),
                f"{resources.name}-generator.log",
            )
            last_line = time.monotonic()
            while step.process.poll() is None:
                _check(pipeline, log)
                if time.monotonic() - last_line >= PROGRESS_EVERY_SECONDS:
                    _progress(f"{step.rate:g}/s", begun, watcher, sampler, previous)
                    last_line = time.monotonic()
                time.sleep(0.2)
            if step.process.returncode != 0:
                raise BenchmarkError(f"the generator exited with status {step.process.returncode}")
            step.load()

        mine = np.concatenate([step.ids for step in steps])
        truth = read_ground_truth(cfg.pg_dsn, floor_id, int(mine.max()), window)
        ranked = rank_in_buckets(truth)
        needed = last_needed_counts(ranked, mine)
        print(f"benchmark-streaming: draining ({len(needed):,} buckets hold measured events)", file=sys.stderr)
        drain_until = time.monotonic() + args.drain_seconds
        while time.monotonic() < drain_until:
            _check(pipeline, log)
            counts = watcher.counts()
            if all(counts.get(key, 0) >= count for key, count in needed.items()):
                break
            if time.monotonic() - last_line >= PROGRESS_EVERY_SECONDS:
                _progress("draining", begun, watcher, sampler, previous)
                last_line = time.monotonic()
            time.sleep(0.2)
        watcher.stop()
        sampler.stop()

        visible = visible_at(ranked, mine, watcher.history())
        committed = np.concatenate([step.committed for step in steps])
        figures = []
        offset = 0
        for step in steps:
            size = len(step.ids)
            figure = step_figures(
                step.rate,
                committed[offset : offset + size],
                visible[offset : offset + size],
                committed,
                visible,
                args.max_backlog_growth,
            )
            cores, busy, peak = sampler.over(float(step.committed.min()), float(step.committed.max()))
            figures.append(dataclasses.replace(figure, pipeline_cores=cores, machine_busy=busy, peak_rss=peak))
            offset += size
        print()
        print(format_table(figures))
        print()
        for step in steps:
            by_service = sampler.cores_by_service(float(step.committed.min()), float(step.committed.max()))
            print(
                f"cores at {step.rate:,g}/s: " + ", ".join(f"{name} {cores:.2f}" for name, cores in by_service.items())
            )
        print()
        for line in memory_trend(sampler.samples, float(steps[0].committed.min()), float(steps[-1].committed.max())):
            print(line)
        print()
        print(
            f"measured {len(mine):,} events in {len(steps)} steps; {watcher.polls:,} Redis polls "
            f"({watcher.errors} failed); ranks from {len(truth.ids):,} PostgreSQL rows "
            f"({len(truth.ids) - len(mine):,} written by others or the warm-up); job log {log}"
        )
        _warnings(watcher, truth, window)
        print(summary_line(figures, sampler.peak, sampler.peak_breakdown))
        for verdict in target_verdicts(figures):
            print(f"benchmark-streaming: target {verdict}")
    except BenchmarkError as exc:
        print(f"benchmark-streaming: {exc}", file=sys.stderr)
        exit_status = 1
    except KeyboardInterrupt:
        print("benchmark-streaming: interrupted", file=sys.stderr)
        exit_status = 130
    finally:
        for step in steps:
            if step.process is not None:
                stop_job(
                    cfg, step.process, f"the {step.rate:g}/s generator", f"{resources.name}-generator.log", PROGRAM
                )
        if warmup is not None:
            stop_job(cfg, warmup, "the warm-up generator", f"{resources.name}-warmup.log", PROGRAM)
        if watcher is not None:
            watcher.stop()
        if sampler is not None:
            sampler.stop()
        if pipeline is not None:
            stop_job(resources.stack, pipeline, "the streaming job", log_name, PROGRAM, timeout=60)
        if not args.keep:
            resources.remove(client)
            shutil.rmtree(directory, ignore_errors=True)
        client.close()
    return exit_status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop_on_first_signal()
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
