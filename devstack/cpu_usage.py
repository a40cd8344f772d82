"""CPU time of the local stack's services and of the streaming job's processes, from /proc.

Used by the benchmarks to say where a machine's cores go at a given load.
"""

from __future__ import annotations

import os
from pathlib import Path


def service_of(pid: int, command: str) -> str:
    """The stack service (or part of the streaming job) a process belongs to, from its command name and line."""
    if command.startswith("postgres"):
        return "postgres"
    if command.startswith("redis"):
        return "redis"
    if command == "prism":
        return "job: prism"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if command.startswith("local-bigquery") or "local-bigquery" in cmdline:
        return "bigquery emulator"
    if command == "java":
        if "expansion-service" in cmdline:
            return "job: java"  # the Kafka read runs in the expansion service's loopback worker
        return "debezium connect" if "Connect" in cmdline else "kafka" if "kafka.Kafka" in cmdline else "other"
    if command.startswith("python"):
        for marker, service in (
            ("devstack.generator", "generator"),
            ("devstack.external_api", "http receiver"),
            ("pipelines.streaming", "job: python"),
        ):
            if marker in cmdline:
                return service
    return "other"


def cpu_seconds_by_service() -> dict[str, float]:
    """CPU seconds (user + system) of every live process, summed per service."""
    ticks = os.sysconf("SC_CLK_TCK")
    by_service: dict[str, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        command = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        service = service_of(int(entry.name), command)
        by_service[service] = by_service.get(service, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return by_service
