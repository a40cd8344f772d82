"""CPU time and memory of the local stack's services and of the streaming job's processes, from /proc.

Used by the benchmarks to say where a machine's cores go at a given load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def processes() -> Iterator[tuple[Path, str, list[str]]]:
    """(/proc/<pid>, command name, the stat fields after the name) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process ended meanwhile
        yield entry, stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(fields: list[str]) -> float:
    """User + system CPU seconds of a process, from its stat fields (after the name)."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def session_usage(session: int) -> tuple[int, dict[str, int], float]:
    """RSS (total and per command name) and CPU seconds of every live process of a session.

    A session rather than a parent chain: the Java expansion service and Prism are the launcher's children,
    and a session still finds them if they outlive it (start_new_session gives the job a session of its own).
    """
    page = os.sysconf("SC_PAGE_SIZE")
    total, by_name, cpu = 0, {}, 0.0
    for entry, command, fields in processes():
        if int(fields[3]) != session:
            continue
        try:
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        name = "python" if command.startswith("python") else command
        rss = int(statm[1]) * page
        total += rss
        by_name[name] = by_name.get(name, 0) + rss
        cpu += cpu_seconds(fields)
    return total, by_name, cpu


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
    if command.startswith("local-bigquery") or "local-bigquery" in cmdline or "bigquery_emulator_serve" in cmdline:
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
    by_service: dict[str, float] = {}
    for entry, command, fields in processes():
        service = service_of(int(entry.name), command)
        by_service[service] = by_service.get(service, 0.0) + cpu_seconds(fields)
    return by_service
