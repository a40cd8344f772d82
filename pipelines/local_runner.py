"""Options for running the pipelines on this machine with Beam's Prism runner.

Prism is the local runner that streams for real and runs cross-language transforms (see
docs/local-streaming.md). Its binary, like the Java expansion services, is built ahead of time by
``scripts/fetch-beam-artifacts`` for the pinned Beam version, so nothing is downloaded when a pipeline
starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import apache_beam

CACHE_DIR = Path(os.environ.get("ENGAGEMENT_CACHE_DIR", Path.home() / ".cache" / "engagement-pipeline"))


def prism_binary() -> Path:
    """The Prism binary of the running Beam version; a clear error if it was never fetched."""
    binary = CACHE_DIR / "prism" / apache_beam.__version__ / "prism"
    if not binary.is_file():
        raise FileNotFoundError(
            f"Prism {apache_beam.__version__} is not at {binary}; run scripts/fetch-beam-artifacts prism"
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
        # Prism splits a bundle that makes no progress for two 100 ms ticks, and then frees the residual's
        # keys while the primary still holds the same keys: a second bundle runs a stateful DoFn's key at once,
        # on state read before the first commits. That put the BigQuery writer's offsets ahead of its stream
        # and could pass a duplicate twice (docs/local-streaming.md, "Split bundles ran a key twice at once").
        "--experiments=prism_disable_sdf_split",
    ]
    if streaming:
        args.append("--streaming")
    return args
