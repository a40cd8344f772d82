#!/usr/bin/env python
"""Probe: does KafkaIO run unbounded, through a triggered GroupByKey, on Prism here? (not a test)

Runs the configuration recommended in docs/local-streaming.md for ``--seconds`` while producing Debezium-shaped
records to a topic of its own, then prints how long records took from produce to the first pane that held
them, how many panes of each timing were seen, and whether Kafka offsets were committed. Exits non-zero when
nothing flowed or the job failed.

  Prism (Go, --prism_location)  <-  Python SDK worker: LOOPBACK (in this process)
                                <-  Java SDK worker: in the expansion service's JVM (--alsoStartLoopbackWorker)

Prerequisites: ``scripts/stack up`` and ``scripts/fetch-beam-artifacts prism kafka``. Example:

  .venv/bin/python scripts/probe_kafka_streaming.py --seconds 120 --rate 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState
from apache_beam.transforms import trigger, window
from apache_beam.transforms.external import JavaJarExpansionService
from apache_beam.utils.subprocess_server import SubprocessServer
from apache_beam.utils.timestamp import Duration
from apache_beam.version import __version__ as beam_version
from confluent_kafka import Consumer, Producer, TopicPartition

PANE_TIMINGS = {0: "EARLY", 1: "ON_TIME", 2: "LATE", 3: "UNKNOWN"}

_LOG = logging.getLogger("probe")


def default_prism() -> Path:
    """The patched build that pipelines/local_runner.py uses (devstack/prism-patches)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines.local_runner import prism_binary

    return prism_binary()


def default_expansion_jar() -> Path:
    """The KafkaIO expansion service that scripts/fetch-beam-artifacts put in place for this Beam version."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transforms.expansion import fetched_jar

    jar = fetched_jar("kafka", beam_version)
    if jar is None:
        raise SystemExit("probe: no KafkaIO expansion service; run scripts/fetch-beam-artifacts kafka")
    return jar


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=60, help="How long to produce and run the pipeline.")
    parser.add_argument("--rate", type=float, default=20.0, help="Records produced per second.")
    parser.add_argument("--keys", type=int, default=4, help="Distinct content ids (GroupByKey keys).")
    parser.add_argument(
        "--bootstrap",
        default=os.environ.get("STACK_KAFKA_BOOTSTRAP", "127.0.0.1:29092"),
        help="Kafka bootstrap servers.",
    )
    parser.add_argument(
        "--topic", default="", help="Topic to produce to and read; default a fresh probe.kafka-streaming.<id>."
    )
    parser.add_argument(
        "--group", default="", help="Consumer group; default a fresh probe-<id>. Reuse one to watch a restart resume."
    )
    parser.add_argument("--window-seconds", type=int, default=10, help="Fixed window size.")
    parser.add_argument("--early-firing-seconds", type=int, default=1, help="AfterProcessingTime early firing delay.")
    parser.add_argument(
        "--allowed-lateness-seconds",
        type=int,
        default=30,
        help="Allowed lateness. Keep it above the early-firing delay: see Prism's nil-map panic in the doc.",
    )
    parser.add_argument("--prism", type=Path, default=default_prism(), help="Prism binary.")
    parser.add_argument(
        "--expansion-jar", type=Path, default=default_expansion_jar(), help="KafkaIO expansion service jar."
    )
    parser.add_argument("--out", type=Path, default=None, help="Pane log (JSON lines); default a temp file.")
    parser.add_argument("--verbose", action="store_true", help="Show Beam's, Prism's and the JVM's INFO logs.")
    return parser.parse_args(argv)


def envelope(record_id: str, content_id: str, produced_at: float) -> bytes:
    """A Debezium change event (no schema) for an engagement_events insert, plus the probe's produce time."""
    ts_ms = int(produced_at * 1000)
    after = {
        "id": record_id,
        "content_id": content_id,
        "user_id": "probe-user",
        "event_type": "view",
        "event_ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(produced_at)) + f".{ts_ms % 1000:03d}000Z",
        "duration_ms": 1000,
        "probe_produced_at": produced_at,
    }
    source = {"connector": "postgresql", "name": "cdc", "db": "engagement", "schema": "public"}
    source |= {"table": "engagement_events", "ts_ms": ts_ms}
    return json.dumps({"before": None, "after": after, "source": source, "op": "c", "ts_ms": ts_ms}).encode()


class ProduceLoop(threading.Thread):
    """Produces ``rate`` records a second until stopped; batches are flushed by librdkafka, not per record."""

    def __init__(self, bootstrap: str, topic: str, rate: float, keys: int) -> None:
        super().__init__(name="probe-producer", daemon=True)
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self._topic, self._rate, self._keys = topic, rate, keys
        self._halt = threading.Event()
        self.produced: dict[str, float] = {}

    def send(self, index: int) -> None:
        record_id, content_id = str(uuid.uuid4()), f"content-{index % self._keys}"
        produced_at = time.time()
        self._producer.produce(self._topic, key=content_id.encode(), value=envelope(record_id, content_id, produced_at))
        self.produced[record_id] = produced_at
        self._producer.poll(0)

    def run(self) -> None:
        start, index = time.monotonic(), 0
        while not self._halt.is_set():
            self.send(index)
            index += 1
            self._halt.wait(max(0.0, start + index / self._rate - time.monotonic()))
        self._producer.flush(10)

    def stop(self) -> None:
        self._halt.set()
        self.join(15)

    def create_topic(self) -> None:
        """One record before the pipeline starts, so that the topic (auto-created) has partitions to assign."""
        self.send(0)
        self._producer.flush(10)


def to_keyed_event(record: Any) -> window.TimestampedValue:
    """KafkaIO Row -> (content_id, (record id, produced_at)), event-timestamped with the record's event time."""
    after = json.loads(record.value)["after"]
    produced_at = after["probe_produced_at"]
    return window.TimestampedValue((after["content_id"], (after["id"], produced_at)), produced_at)


class AppendPanes(beam.DoFn):
    """Appends one JSON line per fired pane to a local file: the probe's observable output."""

    def __init__(self, path: str) -> None:
        self._path = path

    def setup(self) -> None:
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - closed in teardown()

    def process(
        self,
        element: tuple[str, list[tuple[str, float]]],
        win: window.IntervalWindow = beam.DoFn.WindowParam,
        pane: Any = beam.DoFn.PaneInfoParam,
    ) -> None:
        key, values = element
        line = {
            "observed_at": time.time(),
            "key": key,
            "window_end": float(win.end),
            "timing": PANE_TIMINGS.get(pane.timing, str(pane.timing)),
            "index": pane.index,
            "ids": [record_id for record_id, _ in values],
        }
        self._file.write(json.dumps(line) + "\n")

    def finish_bundle(self) -> None:
        self._file.flush()

    def teardown(self) -> None:
        self._file.close()


def build(pipeline: beam.Pipeline, args: argparse.Namespace, topic: str, group: str, out: Path) -> None:
    expansion = JavaJarExpansionService(
        str(args.expansion_jar),
        # Replaces Beam's default arguments: no --filesToStage (nothing is staged to a worker in the same JVM),
        # and --alsoStartLoopbackWorker always, not only when Beam happens to hold a subprocess cache open.
        extra_args=["{{PORT}}", "--alsoStartLoopbackWorker"],
    )
    _ = (
        pipeline
        | "KafkaIO"
        >> ReadFromKafka(
            consumer_config={
                "bootstrap.servers": args.bootstrap,
                "group.id": group,
                "auto.offset.reset": "earliest",
                # Prism rejects commit_offset_in_finalize (its commit step needs @RequiresStableInput):
                # the consumer commits what it has polled instead.
                "enable.auto.commit": "true",
                "auto.commit.interval.ms": "1000",
            },
            topics=[topic],
            with_metadata=True,
            commit_offset_in_finalize=False,
            expansion_service=expansion,
        )
        | "ToKeyedEvent" >> beam.Map(to_keyed_event)
        | "FixedWindows"
        >> beam.WindowInto(
            window.FixedWindows(args.window_seconds),
            trigger=trigger.AfterWatermark(
                early=trigger.AfterProcessingTime(args.early_firing_seconds), late=trigger.AfterCount(1)
            ),
            accumulation_mode=trigger.AccumulationMode.ACCUMULATING,
            allowed_lateness=Duration.of(args.allowed_lateness_seconds),
        )
        | "GroupByContent" >> beam.GroupByKey()
        | "AppendPanes" >> beam.ParDo(AppendPanes(str(out)))
    )


@contextlib.contextmanager
def subprocesses_kept_alive() -> Iterator[None]:
    """Keeps the expansion service (and so the Java worker inside it) alive until the job is over.

    ``with beam.Pipeline() as p`` does the same but waits for an unbounded job forever; the probe needs the
    result handle to cancel it.
    """
    with SubprocessServer.cache_subprocesses():
        yield


def committed_offsets(bootstrap: str, topic: str, group: str) -> tuple[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": "false"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        total_committed = sum(max(tp.offset, 0) for tp in committed)
        total_end = sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions)
        return total_committed, total_end
    finally:
        consumer.close()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(out: Path, produced: dict[str, float], started_at: float) -> int:
    """Prints the probe's findings; returns how many produced records were observed."""
    panes = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    first_seen: dict[str, float] = {}
    timings_by_window: dict[tuple[str, float], list[str]] = defaultdict(list)
    for pane in sorted(panes, key=lambda p: p["observed_at"]):
        timings_by_window[(pane["key"], pane["window_end"])].append(pane["timing"])
        for record_id in pane["ids"]:
            first_seen.setdefault(record_id, pane["observed_at"])
    latencies = [first_seen[r] - produced[r] for r in produced if r in first_seen]
    print(f"panes: {len(panes)} {dict(Counter(p['timing'] for p in panes))}")
    replayed = len(set(first_seen) - set(produced))
    print(f"records: produced {len(produced)}, observed {len(latencies)}, observed from before this run {replayed}")
    if panes:
        print(f"first pane {min(p['observed_at'] for p in panes) - started_at:.1f}s after the job was submitted")
    if latencies:
        print(
            "produce -> first pane latency: "
            f"min {min(latencies):.2f}s p50 {statistics.median(latencies):.2f}s "
            f"p95 {percentile(latencies, 0.95):.2f}s max {max(latencies):.2f}s"
        )
    # Anomalies against Beam's model for AfterWatermark(early, late): nothing EARLY after ON_TIME, one ON_TIME.
    early_after_on_time = sum(
        1 for ts in timings_by_window.values() if "ON_TIME" in ts and "EARLY" in ts[ts.index("ON_TIME") :]
    )
    repeated_on_time = sum(1 for ts in timings_by_window.values() if ts.count("ON_TIME") > 1)
    print(
        f"windows x keys: {len(timings_by_window)}; with an EARLY pane after ON_TIME: {early_after_on_time}; "
        f"with more than one ON_TIME pane: {repeated_on_time}"
    )
    return len(latencies)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    _LOG.setLevel(logging.INFO)
    for path, hint in ((args.prism, "prism"), (args.expansion_jar, "kafka")):
        if not path.exists():
            print(f"probe: {path} is missing; run scripts/fetch-beam-artifacts {hint}", file=sys.stderr)
            return 2
    topic = args.topic or f"probe.kafka-streaming.{uuid.uuid4().hex[:8]}"
    group = args.group or f"probe-{uuid.uuid4().hex[:8]}"
    out = args.out or Path(tempfile.mkdtemp(prefix="probe-kafka-")) / "panes.jsonl"
    print(f"probe: beam {beam_version}, prism {args.prism}, expansion {args.expansion_jar}")
    print(f"probe: topic {topic}, group {group}, panes -> {out}")

    producer = ProduceLoop(args.bootstrap, topic, args.rate, args.keys)
    producer.create_topic()
    options = PipelineOptions(
        [
            "--runner=PrismRunner",
            f"--prism_location={args.prism}",
            "--environment_type=LOOPBACK",
            "--streaming",
            f"--job_name=probe-{topic}",
        ]
    )
    state = "NOT STARTED"
    with subprocesses_kept_alive():
        started_at = time.time()
        pipeline = beam.Pipeline(options=options)
        build(pipeline, args, topic, group, out)
        result: PipelineResult = pipeline.run()
        print(f"probe: job submitted {time.time() - started_at:.1f}s after start (expansion included)")
        producer.start()
        try:
            state = result.wait_until_finish(duration=args.seconds * 1000)
        except Exception as error:  # noqa: BLE001 - a failed job is a finding to report, not a crash
            print(f"probe: job failed: {error}".splitlines()[0], file=sys.stderr)
            state = PipelineState.FAILED
        finally:
            producer.stop()
        if state in (PipelineState.RUNNING, None):
            # Let the last early firings land before cancelling.
            time.sleep(args.early_firing_seconds + 2)
            result.cancel()
            state = result.state
    print(f"probe: final job state {state}")
    committed, end = committed_offsets(args.bootstrap, topic, group)
    print(f"offsets: committed {committed} of {end} (group {group})")
    observed = report(out, producer.produced, started_at)
    if state == PipelineState.FAILED or observed == 0:
        print("probe: FAILED (nothing flowed or the job failed)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
