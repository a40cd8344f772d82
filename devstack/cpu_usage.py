"""CPU time and memory of the local stack's services and of the streaming job's processes, through psutil.

Used by the benchmarks to say where a machine's cores go at a given load.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import psutil

_INFO = ("name", "cmdline", "cpu_times", "memory_info")


def processes() -> Iterator[psutil.Process]:
    """Every live process, with ``info`` holding its name, command line, CPU times and memory (None if unreadable)."""
    yield from psutil.process_iter(_INFO)


def session_of(process: psutil.Process) -> int | None:
    """The session id of ``process``, or None once it has ended."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        return os.getsid(process.pid)
    return None


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of a process from ``processes()``."""
    times = process.info["cpu_times"]
    return 0.0 if times is None else times.user + times.system


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs since boot; idle and I/O wait count as not busy."""
    times = psutil.cpu_times()
    total = sum(times)
    return total - times.idle - getattr(times, "iowait", 0.0), total


def session_usage(session: int) -> tuple[int, dict[str, int], float]:
    """RSS (total and per command name) and CPU seconds of every live process of a session.

    A session rather than a parent chain: the Java expansion service and Prism are the launcher's children,
    and a session still finds them if they outlive it (start_new_session gives the job a session of its own).
    """
    total, by_name, cpu = 0, {}, 0.0
    for process in processes():
        memory = process.info["memory_info"]
        if memory is None or session_of(process) != session:
            continue
        command = process.info["name"] or "?"
        name = "python" if command.startswith("python") else command
        total += memory.rss
        by_name[name] = by_name.get(name, 0) + memory.rss
        cpu += cpu_seconds(process)
    return total, by_name, cpu


def service_of(command: str, cmdline: Sequence[str]) -> str:
    """The stack service (or part of the streaming job) a process belongs to, from its name and command line."""
    if command.startswith("postgres"):
        return "postgres"
    if command.startswith("redis"):
        return "redis"
    if command == "prism":
        return "job: prism"
    line = " ".join(cmdline)
    if command.startswith("local-bigquery") or "local-bigquery" in line or "bigquery_emulator_serve" in line:
        return "bigquery emulator"
    if command == "java":
        if "expansion-service" in line:
            return "job: java"  # the Kafka read runs in the expansion service's loopback worker
        return "debezium connect" if "Connect" in line else "kafka" if "kafka.Kafka" in line else "other"
    if command.startswith("python"):
        for marker, service in (
            ("devstack.generator", "generator"),
            ("devstack.external_api", "http receiver"),
            ("pipelines.streaming", "job: python"),
        ):
            if marker in line:
                return service
    return "other"


def cpu_seconds_by_service() -> dict[str, float]:
    """CPU seconds (user + system) of every live process, summed per service."""
    by_service: dict[str, float] = {}
    for process in processes():
        service = service_of(process.info["name"] or "", process.info["cmdline"] or ())
        by_service[service] = by_service.get(service, 0.0) + cpu_seconds(process)
    return by_service
