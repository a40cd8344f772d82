"""The stack-load benchmark's attribution of processes to services and its table."""

from __future__ import annotations

import os

from devstack.benchmark_stack_load import StepLoad, format_table
from devstack.cpu_usage import service_of


def test_processes_are_attributed_to_their_service():
    assert service_of(1, "postgres") == "postgres"
    assert service_of(1, "redis-server") == "redis"
    assert service_of(1, "prism") == "job: prism"
    # This test's own interpreter is Python, but no part of the stack or the job.
    assert service_of(os.getpid(), "python3.11") == "other"
    assert service_of(2**22 + 1, "java") == "other"  # gone: no command line to tell Kafka from Connect


def test_the_table_has_a_column_per_service_busiest_first():
    steps = [
        StepLoad(1000, 998.0, 997.0, 0.41, {"postgres": 0.30, "kafka": 0.10}),
        StepLoad(5000, 4100.0, 3900.0, 0.97, {"postgres": 0.90, "kafka": 0.20, "generator": 0.50}),
    ]
    header, _, first, second = format_table(steps).splitlines()
    assert header.split()[-3:] == ["postgres", "generator", "kafka"]
    assert first.split() == ["1,000", "998", "997", "41%", "0.30", "0.00", "0.10"]
    assert second.split() == ["5,000", "4,100", "3,900", "97%", "0.90", "0.50", "0.20"]
