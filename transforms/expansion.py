"""Which Java expansion service a cross-language transform (KafkaIO, the Storage Write API sink) uses.

Beam would otherwise download a jar of its own version when a pipeline starts. This project fetches (or
assembles) those jars ahead of time with ``scripts/fetch-beam-artifacts``, so a pipeline never downloads
anything: by default each transform uses the jar fetched for the running Beam version.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apache_beam
from apache_beam.transforms.external import JavaJarExpansionService

from transforms import artifacts
from transforms.artifacts import Component

LOCAL_SERVICES: dict[Component, Component] = {"kafka": "kafka-local"}
"""The service a local runner uses instead: KafkaIO with our patches compiled in (devstack/kafkaio-patches)."""

LOOPBACK_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"
"""JIT with C1 only in a JVM that also runs the job's Java worker: that worker only moves records between Kafka
and the runner, and C2's compiling cost 0.05-0.07 of a core for the first minutes of every job, more than the
worker itself (docs/benchmarks.md, session 16)."""


@contextlib.contextmanager
def _java_options(options: str) -> Iterator[None]:
    """``options`` added to ``JDK_JAVA_OPTIONS`` (read by every ``java`` launched meanwhile), restored after."""
    before = os.environ.get("JDK_JAVA_OPTIONS")
    os.environ["JDK_JAVA_OPTIONS"] = f"{before} {options}" if before else options
    try:
        yield
    finally:
        if before is None:
            del os.environ["JDK_JAVA_OPTIONS"]
        else:
            os.environ["JDK_JAVA_OPTIONS"] = before


class LoopbackExpansionService(JavaJarExpansionService):
    """A jar's expansion service whose JVM also runs the job's Java worker (``--alsoStartLoopbackWorker``), started
    with ``LOOPBACK_JVM_OPTIONS``. Beam starts the JVM on entering, with this process's environment."""

    def __enter__(self) -> Any:
        with _java_options(LOOPBACK_JVM_OPTIONS):
            return super().__enter__()


def fetched_jar(component: Component, version: str = apache_beam.__version__) -> Path | None:
    """The jar scripts/fetch-beam-artifacts put in place for ``version``, if any: Beam's released one first."""
    candidates = [artifacts.assembled_jar(component, version)]
    if component in artifacts.SHADED_ARTIFACTS:
        candidates.insert(0, artifacts.shaded_jar(component, version))
    if component in LOCAL_SERVICES:
        # Expanding needs no patched class: the local assembly serves when nothing else was fetched.
        candidates.append(artifacts.assembled_jar(LOCAL_SERVICES[component], version))
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def java_expansion_service(
    option: str | None, component: Component, loopback_worker: bool = False
) -> JavaJarExpansionService | str:
    """The expansion service for ``component`` from an option value.

    ``option`` is ``host:port`` of a running service, a jar path, or empty for the jar fetched for this
    Beam version. ``loopback_worker`` runs the Java SDK worker inside the expansion service's JVM, which
    local runners without Docker need (docs/local-streaming.md); Dataflow brings its own Java workers. That
    worker then runs the classes of the jar, so a local runner gets the service with our patches
    (``LOCAL_SERVICES``; docs/local-streaming.md, "The partitions' reads ended out of step").
    """
    if option and not option.endswith(".jar"):
        return option
    if not option and loopback_worker and component in LOCAL_SERVICES:
        component = LOCAL_SERVICES[component]
        jar: Path | None = artifacts.assembled_jar(component)
    else:
        jar = Path(option) if option else fetched_jar(component)
    if jar is None or not jar.is_file():
        raise FileNotFoundError(
            f"no {component} expansion service jar for Beam {apache_beam.__version__}"
            f"{f' at {jar}' if jar else ''}; run scripts/fetch-beam-artifacts {component}"
        )
    # {{PORT}} is where Beam substitutes the port it picks; passing the loopback flag here rather than
    # relying on Beam's own (added only inside its subprocess cache) avoids a duplicate flag the JVM refuses.
    if loopback_worker:
        return LoopbackExpansionService(str(jar), extra_args=["{{PORT}}", "--alsoStartLoopbackWorker"])
    return JavaJarExpansionService(str(jar))
