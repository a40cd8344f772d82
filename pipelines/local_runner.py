"""Options for running the pipelines on this machine with Beam's Prism runner.

Prism is the local runner that streams for real and runs cross-language transforms (see
docs/local-streaming.md). Its binary, like the Java expansion services, is built ahead of time by
``scripts/fetch-beam-artifacts`` (Prism at its own version, ``transforms.artifacts.PRISM_VERSION``; the Java
services at the pinned Beam version), so nothing is downloaded when a pipeline starts.
"""

from __future__ import annotations

from pathlib import Path

from transforms import artifacts


def prism_binary() -> Path:
    """The Prism binary of ``artifacts.prism_version()`` with our patches; a clear error if it was never built."""
    binary = artifacts.prism_binary()
    if not binary.is_file():
        raise FileNotFoundError(
            f"Prism {artifacts.prism_version()} with our patches is not at {binary}; "
            "run scripts/fetch-beam-artifacts prism"
        )
    return binary


def prism_args(streaming: bool) -> list[str]:
    """Pipeline arguments for Prism with the Python worker in this process (LOOPBACK)."""
    args = [
        "--runner=PrismRunner",
        f"--prism_location={prism_binary()}",
        "--environment_type=LOOPBACK",
        # Beam keeps one Prism job server per process, made with the options of the first Prism run; in a
        # process that ran a DirectRunner pipeline first (which may try Prism without our binary) it is
        # unusable, so every run here gets its own.
        "--experiments=disable_prism_server_singleton",
        # Beam's portable runner gives the job's status stream this deadline (default 300 s): without it a
        # streaming or long batch job fails with DEADLINE_EXCEEDED after five minutes, while still running.
        "--job_server_timeout=86400",
    ]
    if streaming:
        # Our Prism patch 0007: the early panes a batch of elements fires share one bundle, not one each.
        args += ["--streaming", "--experiments=prism_fire_panes_per_batch"]
    return args
