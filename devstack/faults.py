"""``scripts/faults``: the fault matrix of issue 17, each fault injected under load and audited exactly.

For each fault, on a stack of its own (``STACK_INSTANCE=faults``, whose services it kills and restarts):

1. a fresh BigQuery dataset, Redis key prefix and consumer group; the streaming job starts as
   ``scripts/run-local`` runs it (Prism), with short windows so every window closes within the round;
2. the generator writes ``--rate`` events a second to PostgreSQL for ``--load-seconds`` (Debezium -> Kafka ->
   the job); ``--fault-after`` seconds in, the fault is injected and later ended;
3. when the generator is done, every sink is audited against PostgreSQL (devstack/audit.py) until it is exact
   or ``--converge-seconds`` pass: the BigQuery ids (missing, and raw copies beyond one), the HTTP API's
   receipts, ``window_aggregates_current`` and the Redis buckets per window and content, and the dead letters
   of the round's events;
4. a table row: the fault, the seconds from the fault's end until every sink was exact, the events lost and
   doubled (over all sinks), the dead letters, and the commit -> Redis p95 while the fault lasted (SPEC §6:
   an HTTP outage must not break Redis's freshness).

``poison-input`` is a fault of the data, not of a service: the records that once stopped the job (issue 16)
go to a JSON topic of the round's own, which the job reads beside the CDC topic, while the load goes on. It is
exact when the sinks are, the job is still up, and each poison record the job should dead-letter is in the
dead letters exactly once, at its own Kafka position.

The exit status is 0 when every fault ended exact, 1 otherwise. Results: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg2
import redis
import requests
from google.cloud import bigquery

from devstack import audit, bigquery_clients
from devstack.benchmark_streaming import Resources, generator_argv, sequence_value
from devstack.cli import ensure_tables, ensure_up, load_services
from devstack.config import StackConfig, load_config, use_instance
from devstack.generator import (
    FUZZ_MAX_MESSAGE_BYTES,
    POISON_KINDS,
    POISON_OUTCOMES,
    KafkaJsonSink,
    KafkaRecord,
    Kind,
    poison_record,
)
from devstack.process import running_pid, stop_job, stop_orphaned_jobs
from devstack.run_local import pipeline_args, start_logged
from transforms.sinks.redis_layout import RedisKeys

WINDOW_SECONDS = 10
LATENESS_SECONDS = 30


@dataclass
class Round:
    """One fault's run: its resources and its job."""

    cfg: StackConfig
    resources: Resources
    fault_seconds: float
    job_options: tuple[str, ...] = ()
    poison: PoisonFeed | None = None
    job: subprocess.Popen | None = None
    restarts: int = 0

    @property
    def log_name(self) -> str:
        return f"{self.resources.name}.log"

    def start_job(self, start: datetime | None) -> None:
        """``start`` None resumes from what the sinks hold, as ``scripts/run-local`` always does."""
        name = self.resources.name
        argv = [
            sys.executable,
            "-m",
            "pipelines.streaming",
            *pipeline_args(self.resources.stack, start, WINDOW_SECONDS, LATENESS_SECONDS),
            f"--consumer_group={name}",
            f"--redis_key_prefix={name}",
            f"--dedup_horizon_seconds={WINDOW_SECONDS + LATENESS_SECONDS}",
            "--resume_margin_seconds=20",
            *self.job_options,
        ]
        self.job = start_logged(self.cfg, argv, self.log_name, env={"HTTP_API_TOKEN": self.cfg.http_api_token})

    def kill_job(self) -> None:
        """``kill -9`` of the job's whole session: the launcher, its Prism and its Java workers."""
        if self.job is not None and self.job.poll() is None:
            os.killpg(self.job.pid, signal.SIGKILL)
            self.job.wait()

    def stop_job(self) -> None:
        if self.job is not None:
            stop_job(self.cfg, self.job, "the job", self.log_name, "faults", timeout=60)


# --- the faults -----------------------------------------------------------------------------------------------


def _service(name: str):  # noqa: ANN202 - a devstack service module
    for service in load_services():
        if service.name == name and service.module is not None:
            return service.module
    raise ValueError(f"no stack service {name!r}")


def _kill_service(cfg: StackConfig, name: str) -> None:
    pid = running_pid(cfg, name)
    if pid is None:
        raise RuntimeError(f"{name} is not running")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while running_pid(cfg, name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)


def kill_and_restart(name: str) -> Callable[[Round], None]:
    def inject(run: Round) -> None:
        _kill_service(run.cfg, name)
        time.sleep(run.fault_seconds)
        ensure_up(run.cfg, [name])

    return inject


def restart(name: str) -> Callable[[Round], None]:
    def inject(run: Round) -> None:
        _service(name).stop(run.cfg)
        time.sleep(run.fault_seconds)
        ensure_up(run.cfg, [name])

    return inject


def kill_job(run: Round) -> None:
    run.kill_job()
    time.sleep(run.fault_seconds)
    run.restarts += 1
    run.start_job(None)


def api_faults(seconds: float, **faults: object) -> Callable[[Round], None]:
    def inject(run: Round) -> None:
        _set_api_faults(run.cfg, **faults)
        try:
            time.sleep(seconds)
        finally:
            _set_api_faults(run.cfg)

    return inject


def _set_api_faults(cfg: StackConfig, **faults: object) -> None:
    response = requests.post(f"{cfg.http_api_url}/admin/faults", json=faults, timeout=10)
    response.raise_for_status()


def flaky_api(run: Round) -> None:
    """30 % of the requests refused: 429 with Retry-After for half the time, then 503."""
    api_faults(30, error_rate=0.3, error_status=429, retry_after=1, seed=17)(run)
    api_faults(30, error_rate=0.3, error_status=503, seed=18)(run)


POISON_COPIES = 3
"""Records of each poison kind sent during the fault, spread over ``POISON_SECONDS``."""
POISON_SECONDS = 60.0


class PoisonFeed:
    """The records that once stopped the job (issue 16), on a JSON topic of the round's own that the job reads
    beside the CDC topic: every poison kind the job dead-letters or skips (none that becomes an event, so the
    audit against PostgreSQL still holds), ``POISON_COPIES`` of each."""

    def __init__(self, cfg: StackConfig, topic: str) -> None:
        self.topic = topic
        # Created before the job starts, with the record size the 2 MB poison record needs. One partition, so
        # that one record primes it (see ``prime``).
        self._sink = KafkaJsonSink(
            cfg.kafka_bootstrap, topic, partitions=1, max_message_bytes=FUZZ_MAX_MESSAGE_BYTES, record_positions=True
        )
        kinds = [kind for kind in POISON_KINDS if POISON_OUTCOMES[kind] != "event"]
        self._records = self._build(kinds * POISON_COPIES)

    def prime(self) -> None:
        """One record the job skips (a tombstone), sent right after the job is launched with its start time.

        KafkaIO fails the job when a partition holds no record at or after the start time (apache/beam#21610;
        docs/reliability.md), and this topic is new and empty when the job starts."""
        [tombstone] = self._build([Kind.POISON_NULL_VALUE])
        self._sink.send([tombstone])

    @staticmethod
    def _build(kinds: list[Kind]) -> list[KafkaRecord]:
        rng = random.Random(17)
        rng.shuffle(kinds)
        first_id = 2**52 + int(time.time() * 1000) * 1000  # far above the table's sequence; never rows
        records = []
        for index, kind in enumerate(kinds):
            obj = {
                "id": first_id + index,
                "content_id": str(uuid.uuid4()),
                "user_id": str(uuid.uuid4()),
                "event_type": "play",
                "event_ts": int(time.time() * 1000),
                "duration_ms": 1000,
                "device": "ios",
                "raw_payload": {"fuzz": index},
            }
            key, value, carried_id = poison_record(kind, obj, rng)
            records.append(KafkaRecord(kind, key, value, carried_id, obj["content_id"]))
        return records

    def send(self) -> None:
        pause = POISON_SECONDS / len(self._records)
        for record in self._records:
            self._sink.send([record])
            time.sleep(pause)
        self._sink.close()

    def tally(self, bq: bigquery.Client, table_prefix: str) -> PoisonTally:
        expected = sum(
            1 for record, _, _ in self._sink.positions or [] if POISON_OUTCOMES[record.kind] == "dead_letter"
        )
        sql = f"SELECT source_partition, source_offset FROM `{table_prefix}.dead_letters` WHERE source_topic = @topic"  # noqa: S608
        config = bigquery.QueryJobConfig(
            query_parameters=[bigquery.ScalarQueryParameter("topic", "STRING", self.topic)]
        )
        positions = [
            (row["source_partition"], row["source_offset"]) for row in bq.query_and_wait(sql, job_config=config)
        ]
        return PoisonTally(expected, len(set(positions)), len(positions))


@dataclass(frozen=True)
class PoisonTally:
    """Poison records the job should dead-letter, the Kafka positions found in the dead letters, and the rows."""

    expected: int
    found: int
    rows: int

    @property
    def exact(self) -> bool:
        return self.expected == self.found == self.rows


def poison_input(run: Round) -> None:
    if run.poison is None:
        raise RuntimeError("the poison-input round has no feed")
    run.poison.send()


FAULTS: dict[str, tuple[str, Callable[[Round], None]]] = {
    "kill-job": ("kill -9 of the job (launcher, Prism, Java), resumed", kill_job),
    "kill-kafka": ("kill -9 of the Kafka broker", kill_and_restart("kafka")),
    "restart-connect": ("restart of Debezium Connect", restart("connect")),
    "kill-redis": ("kill -9 of Redis", kill_and_restart("redis")),
    "restart-bigquery": ("restart of the BigQuery emulator", restart("bigquery-emulator")),
    "restart-postgres": ("restart of PostgreSQL", restart("postgres")),
    "http-outage": ("HTTP API down for 60 s", api_faults(60, outage_seconds=60)),
    "http-flaky": ("30 % 429 (Retry-After) then 503 for 60 s", flaky_api),
    "http-slow": ("HTTP API answering in 2 s for 60 s", api_faults(60, latency_ms=2000)),
    "poison-input": ("the poison records of issue 16 on a JSON topic for 60 s", poison_input),
}


# --- one round ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    fault: str
    recovery_seconds: float | None
    result: audit.Audit | None
    fault_p95_seconds: float | None
    error: str = ""
    poison: PoisonTally | None = None

    @property
    def exact(self) -> bool:
        return self.result is not None and self.result.exact and (self.poison is None or self.poison.exact)

    def row(self) -> str:
        if self.result is None:
            return f"| {self.fault} | - | - | - | - | - | - | **failed**: {self.error} |"
        lost = max(self.result.bigquery_events.lost, self.result.http.lost)
        doubled = max(self.result.bigquery_events.doubled, self.result.http.doubled)
        wrong = self.result.aggregates.wrong + self.result.redis.wrong
        recovered = f"{self.recovery_seconds:.0f} s" if self.recovery_seconds is not None else "**not exact**"
        p95 = f"{self.fault_p95_seconds:.2f} s" if self.fault_p95_seconds is not None else "-"
        verdict = "exact" if self.exact else f"**{self._detail()}**"
        dead = str(self.result.dead_letters)
        if self.poison is not None:
            dead += f"; poison: {self.poison.found} of {self.poison.expected} ({self.poison.rows} rows)"
        return f"| {self.fault} | {recovered} | {lost} | {doubled} | {wrong} | {dead} | {p95} | {verdict} |"

    def _detail(self) -> str:
        r = self.result
        detail = (
            f"BigQuery lost {r.bigquery_events.lost} doubled {r.bigquery_events.doubled}; HTTP lost {r.http.lost} "
            f"doubled {r.http.doubled}; aggregates wrong {r.aggregates.wrong}; Redis buckets wrong {r.redis.wrong}"
        )
        if self.poison is not None and not self.poison.exact:
            detail += "; poison dead letters not one per record"
        return detail


TABLE_HEAD = (
    "| fault | exact again after | events lost | events doubled | windows wrong | dead letters "
    "| commit->Redis p95 during the fault | verdict |\n|---|---|---|---|---|---|---|---|"
)


def _receipts(cfg: StackConfig, ids: list[int]) -> dict[int, int]:
    """How many times the HTTP API stored each of ``ids`` (0 if never)."""
    response = requests.get(f"{cfg.http_api_url}/v1/events/ids", timeout=60)
    response.raise_for_status()
    return audit.receipt_counts(response.json(), ids)


def _ids(dsn: str, after_id: int, up_to_id: int) -> list[int]:
    with contextlib.closing(psycopg2.connect(dsn)) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT id FROM engagement_events WHERE id > %s AND id <= %s ORDER BY id", (after_id, up_to_id))
        return [row[0] for row in cursor.fetchall()]


def _wait_for_output(run: Round, client: redis.Redis, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pattern = f"{run.resources.name}:bucket:*"
    while not any(True for _ in client.scan_iter(match=pattern, count=1000)):
        if run.job is not None and run.job.poll() is not None:
            raise RuntimeError(f"the job exited with status {run.job.returncode}; see {run.cfg.log_dir / run.log_name}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no output in Redis after {timeout:.0f} s; see {run.cfg.log_dir / run.log_name}")
        time.sleep(1)


def run_fault(cfg: StackConfig, fault: str, args: argparse.Namespace) -> Outcome:
    description, inject = FAULTS[fault]
    resources = Resources(cfg, kind=f"faults-{fault}")
    resources.create()
    poison = PoisonFeed(cfg, f"{resources.name}-json") if fault == "poison-input" else None
    job_options = (*args.pipeline_args, *([f"--json_topic={poison.topic}"] if poison is not None else []))
    run = Round(cfg, resources, fault_seconds=args.fault_seconds, job_options=job_options, poison=poison)
    client = redis.Redis.from_url(cfg.redis_url)
    generator: subprocess.Popen | None = None
    try:
        floor = sequence_value(cfg.pg_dsn)
        run.start_job(datetime.now(UTC))
        if poison is not None:
            poison.prime()
        say(f"{fault}: job {resources.name} starting (log {cfg.log_dir / run.log_name})")
        load_ends = time.monotonic() + args.load_seconds
        generator = start_logged(
            cfg, generator_argv(cfg, args.rate, args.load_seconds, None, None), f"{resources.name}-generator.log"
        )
        _wait_for_output(run, client, args.startup_timeout)
        time.sleep(args.fault_after)
        say(f"{fault}: injecting ({description})")
        watch = FreshnessWatch(client, RedisKeys(resources.name))
        watch.start()
        try:
            inject(run)
        finally:
            watch.stop()
        fault_ended = time.monotonic()
        if generator.poll() not in (None, 0) and load_ends - fault_ended > 1:
            # The generator has no reconnect: a PostgreSQL restart ends it. The load goes on with a new one.
            say(f"{fault}: the generator stopped with the fault; starting it again for the rest of the load")
            generator = start_logged(
                cfg,
                generator_argv(cfg, args.rate, load_ends - fault_ended, None, None),
                f"{resources.name}-generator.log",
            )
        say(f"{fault}: fault over; waiting for the generator")
        generator.wait(timeout=args.load_seconds + 600)
        ceiling = sequence_value(cfg.pg_dsn)
        ids = _ids(cfg.pg_dsn, floor, ceiling)
        say(f"{fault}: {len(ids):,} events written; auditing every sink until exact")
        bq = bigquery_clients.rest_client(cfg.bq_rest_endpoint, cfg.bq_project)
        table_prefix = f"{cfg.bq_project}.{resources.dataset}"
        with contextlib.closing(psycopg2.connect(cfg.pg_dsn)) as conn:

            def check() -> audit.Audit:
                if run.job is not None and run.job.poll() is not None:
                    raise RuntimeError(f"the job exited with status {run.job.returncode}")
                return audit.audit_sinks(
                    conn, bq, table_prefix, client, resources.name, _receipts(cfg, ids), ids, WINDOW_SECONDS
                )

            result, _ = audit.wait_until_exact(check, args.converge_seconds)
        recovery = time.monotonic() - fault_ended if result.exact else None
        during = _p95(watch.latencies)
        tally = poison.tally(bq, table_prefix) if poison is not None else None
        return Outcome(fault, recovery, result, during, poison=tally)
    except Exception as error:  # noqa: BLE001 - one fault's failure is a row of the table, not the end of the run
        return Outcome(fault, None, None, None, error=f"{type(error).__name__}: {error}")
    finally:
        if generator is not None and generator.poll() is None:
            generator.terminate()
            generator.wait()
        run.stop_job()
        with contextlib.suppress(Exception):
            _set_api_faults(cfg)
        if not args.keep:
            resources.remove(client)
        client.close()


class FreshnessWatch(threading.Thread):
    """Collects the Redis sink's commit -> write samples (its freshness list) written while a fault lasts. The
    list keeps only the newest samples, so it is read every few seconds."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, interval: float = 3.0) -> None:
        super().__init__(daemon=True)
        self._client, self._key, self._interval = client, keys.freshness(), interval
        self._since_ms = int(time.time() * 1000)
        self._entries: set[bytes] = set()
        self._stopping = threading.Event()

    def _poll(self) -> None:
        with contextlib.suppress(redis.RedisError):  # Redis may be the fault
            for entry in self._client.lrange(self._key, 0, -1):
                if int(entry.split()[0]) >= self._since_ms:
                    self._entries.add(entry)

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._poll()

    def stop(self) -> None:
        self._stopping.set()
        self.join()
        self._poll()

    @property
    def latencies(self) -> list[int]:
        return [int(entry.split()[1]) for entry in self._entries]


def _p95(samples: list[int]) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] / 1000


def say(message: str) -> None:
    print(f"faults: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/faults", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated, in order (default: all): {', '.join(FAULTS)}",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="events per second written (default 100)")
    parser.add_argument("--load-seconds", type=float, default=120.0, help="how long the generator writes (default 120)")
    parser.add_argument(
        "--fault-after", type=float, default=15.0, help="seconds of load after the job's first output (default 15)"
    )
    parser.add_argument(
        "--fault-seconds",
        type=float,
        default=15.0,
        help="how long a killed or stopped process stays down (default 15); HTTP faults last 60 s",
    )
    parser.add_argument(
        "--converge-seconds", type=float, default=300.0, help="longest wait for exact sinks (default 300)"
    )
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="longest wait for the job's first output")
    parser.add_argument("--keep", action="store_true", help="keep each round's dataset and Redis keys")
    parser.add_argument("pipeline_args", nargs="*", help="after --: options for pipelines.streaming")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in faults if name not in FAULTS]
    if unknown:
        print(f"faults: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    use_instance("faults")
    cfg = load_config()
    say("starting the faults' own stack (idempotent)")
    stop_orphaned_jobs(cfg)
    ensure_up(cfg)
    ensure_tables(cfg)
    outcomes = []
    for fault in faults:
        started = time.monotonic()
        outcome = run_fault(cfg, fault, args)
        say(f"{fault}: {outcome.row()} ({time.monotonic() - started:.0f} s)")
        if outcome.result is not None and outcome.result.examples:
            say(f"{fault}: differing windows (actual against expected), e.g.:\n{outcome.result.examples}")
        outcomes.append(outcome)
        ensure_up(cfg)  # whatever a failed round left down
    print(TABLE_HEAD)
    for outcome in outcomes:
        print(outcome.row())
    exact = all(outcome.exact for outcome in outcomes)
    print(f"faults: {sum(1 for outcome in outcomes if outcome.exact)} of {len(outcomes)} exact")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
