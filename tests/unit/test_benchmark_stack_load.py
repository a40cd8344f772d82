"""The stack-load benchmark's attribution of processes to services and its table."""

from __future__ import annotations

import os

from devstack.benchmark_stack_load import StepLoad, format_table
from devstack.cpu_usage import cpu_seconds, machine_cpu_seconds, processes, service_of


def test_processes_are_attributed_to_their_service():
    assert service_of("postgres", ["postgres: checkpointer"]) == "postgres"
    assert service_of("redis-server", ["redis-server", "127.0.0.1:26379"]) == "redis"
    assert service_of("prism", []) == "job: prism"
    assert service_of("java", ["java", "-cp", "x.jar", "kafka.Kafka", "server.properties"]) == "kafka"
    assert service_of("java", ["java", "org.apache.kafka.connect.cli.ConnectDistributed"]) == "debezium connect"
    assert service_of("java", ["java", "-jar", "beam-kafka-local-expansion-service-2.73.0.jar"]) == "job: java"
    assert service_of("python3.13", ["python3.13", "-m", "pipelines.streaming"]) == "job: python"
    assert service_of("python3", ["python3", "bigquery_emulator_serve.py"]) == "bigquery emulator"
    # A test's own interpreter is Python, but no part of the stack or the job.
    assert service_of("python3.11", ["python3.11", "-m", "pytest"]) == "other"
    assert service_of("java", []) == "other"  # gone: no command line to tell Kafka from Connect


def test_this_process_is_measured():
    me = next(process for process in processes() if process.pid == os.getpid())
    assert cpu_seconds(me) > 0
    busy, total = machine_cpu_seconds()
    assert 0 < busy < total


def test_the_table_has_a_column_per_service_busiest_first():
    steps = [
        StepLoad(1000, 998.0, 997.0, 0.41, {"postgres": 0.30, "kafka": 0.10}),
        StepLoad(5000, 4100.0, 3900.0, 0.97, {"postgres": 0.90, "kafka": 0.20, "generator": 0.50}),
    ]
    header, _, first, second = format_table(steps).splitlines()
    assert header.split()[-3:] == ["postgres", "generator", "kafka"]
    assert first.split() == ["1,000", "998", "997", "41%", "0.30", "0.00", "0.10"]
    assert second.split() == ["5,000", "4,100", "3,900", "97%", "0.90", "0.50", "0.20"]
