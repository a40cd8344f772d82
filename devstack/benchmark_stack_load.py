"""What the local stack costs on its own, with no job: the generator writing events into PostgreSQL and Debezium
publishing them to Kafka, at increasing rates.

The streaming job shares the machine's cores with these services, so their cost at a rate bounds what is left
for the job at that rate. Per step it prints the events PostgreSQL committed per second, the change records
reaching the CDC topic per second, the whole machine's busy share, and the CPU cores of each service. It runs on
the benchmarks' own stack (not the one ``scripts/stack up`` starts), starting the services it measures if they are
not running; run it with nothing else busy on the machine.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, TopicPartition

from devstack.benchmark_streaming import generator_argv, parse_rates, sequence_value
from devstack.cli import ensure_up
from devstack.config import StackConfig, load_config, use_instance
from devstack.cpu_usage import cpu_seconds_by_service, machine_cpu_seconds
from devstack.process import stop_job
from devstack.run_local import start_logged

GENERATOR_LOG = "benchmark-stack-load-generator.log"

CDC_TOPIC = "cdc.public.engagement_events"

STACK_SERVICES = ("postgres", "kafka", "connect")
"""What the generator's rows pass through on their way to the CDC topic."""


class TopicEnd:
    """The CDC topic's end offset, summed over its partitions."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "benchmark-stack-load"})
        metadata = self._consumer.list_topics(topic, timeout=10).topics[topic]
        if metadata.error is not None:
            raise SystemExit(f"benchmark-stack-load: topic {topic}: {metadata.error}")
        self._partitions = [TopicPartition(topic, p) for p in metadata.partitions]

    def records(self) -> int:
        return sum(self._consumer.get_watermark_offsets(p, timeout=10)[1] for p in self._partitions)

    def close(self) -> None:
        self._consumer.close()


@dataclass(frozen=True)
class StepLoad:
    target_rate: float
    committed_rate: float
    cdc_rate: float
    machine_busy: float
    cores: dict[str, float]


def measure_step(cfg: StackConfig, topic: TopicEnd, rate: float, seconds: float, settle: float) -> StepLoad:
    """Runs the generator at ``rate`` and measures the middle of its run (``settle`` seconds cut at each end)."""
    generator = start_logged(cfg, generator_argv(cfg, rate, seconds + 2 * settle, None, None), GENERATOR_LOG)
    try:
        time.sleep(settle)
        start_at, start_machine, start_cpu = time.monotonic(), machine_cpu_seconds(), cpu_seconds_by_service()
        start_id, start_records = sequence_value(cfg.pg_dsn), topic.records()
        time.sleep(seconds)
        elapsed = time.monotonic() - start_at
        end_machine, end_cpu = machine_cpu_seconds(), cpu_seconds_by_service()
        end_id, end_records = sequence_value(cfg.pg_dsn), topic.records()
        if generator.poll() not in (None, 0):
            raise SystemExit(f"benchmark-stack-load: the generator exited with status {generator.returncode}")
    finally:
        stop_job(cfg, generator, "the generator", GENERATOR_LOG, "benchmark-stack-load")
    cores = {name: (end_cpu.get(name, 0.0) - start_cpu.get(name, 0.0)) / elapsed for name in end_cpu}
    return StepLoad(
        target_rate=rate,
        committed_rate=(end_id - start_id) / elapsed,
        cdc_rate=(end_records - start_records) / elapsed,
        machine_busy=(end_machine[0] - start_machine[0]) / max(1e-9, end_machine[1] - start_machine[1]),
        cores={name: value for name, value in cores.items() if value >= 0.005},
    )


def format_table(steps: Sequence[StepLoad]) -> str:
    names = {name for step in steps for name in step.cores}
    services = sorted(names, key=lambda name: -max(step.cores.get(name, 0.0) for step in steps))
    header = f"{'target/s':>8} {'commit/s':>8} {'cdc/s':>8} {'machine busy':>12}  " + "  ".join(
        f"{name:>{max(len(name), 5)}}" for name in services
    )
    lines = [header, " " * 40 + "cores used by each service"]
    for step in steps:
        lines.append(
            f"{step.target_rate:>8,.0f} {step.committed_rate:>8,.0f} {step.cdc_rate:>8,.0f} "
            f"{step.machine_busy:>12.0%}  "
            + "  ".join(f"{step.cores.get(name, 0.0):>{max(len(name), 5)}.2f}" for name in services)
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/benchmark-stack-load", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=parse_rates("1000,2500,5000"),
        help="events/s of each step (default 1000,2500,5000)",
    )
    parser.add_argument("--step-seconds", type=float, default=30, help="how long each rate is measured (default 30)")
    parser.add_argument(
        "--settle-seconds", type=float, default=5, help="generator time left out at each end of a step (default 5)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    # The benchmarks' own stack: their load, rows and requests never reach the one scripts/run-local shows.
    use_instance("bench")
    cfg = load_config()
    print("benchmark-stack-load: starting PostgreSQL, Kafka and Debezium (idempotent)", file=sys.stderr, flush=True)
    ensure_up(cfg, list(STACK_SERVICES))
    topic = TopicEnd(cfg.kafka_bootstrap, CDC_TOPIC)
    steps = []
    try:
        for rate in args.rates:
            print(f"benchmark-stack-load: {rate:g} events/s for {args.step_seconds:g}s", file=sys.stderr, flush=True)
            steps.append(measure_step(cfg, topic, rate, args.step_seconds, args.settle_seconds))
    except KeyboardInterrupt:
        return 130
    finally:
        topic.close()
    print(format_table(steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
