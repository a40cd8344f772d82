"""Where this project's prebuilt artifacts live: the one place that names every path.

``scripts/fetch-beam-artifacts`` builds or fetches them, ``pipelines/local_runner.py`` and
``transforms/expansion.py`` use them, ``devstack`` keeps the local stack's downloads beside them, and the shell
scripts ask this module (``python3 transforms/artifacts.py prism-binary``) rather than spelling a path
themselves: a second spelling once sent the backfill to a stale, unpatched Prism.

Everything lives under one cache root, ``$ENGAGEMENT_CACHE_DIR`` (default ``~/.cache/engagement-pipeline``):

=====================================================  ===============================================
``prism/<prism version>-<patches digest>/prism``        Prism, built with ``devstack/prism-patches``
``beam-java/<beam version>/<service>/``                 a Java expansion service assembled from Maven
                                                       (``kafka-local``: with ``devstack/kafkaio-patches``)
``bigquery-emulator/``                                  the BigQuery emulator's virtualenv
``jvm/``                                                Kafka and Debezium's classpaths
=====================================================  ===============================================

Prism's version is ``PRISM_VERSION`` below, not the Python SDK's pin: Prism is a separate program the SDK
starts and talks to over the portable Fn API, so it can run a newer Beam's runner fixes (see
``devstack/prism-patches/README.md``). Everything else, the Java expansion services included, follows the pin.

Beam's released shaded expansion-service jars, when Maven Central serves them, go where Beam itself looks
them up: ``~/.apache_beam/cache/jars``.

Only the standard library is used, so the Dockerfile's build stage and the shell scripts can run this file
with any ``python3`` before the project's virtualenv exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Literal

CACHE_ENV = "ENGAGEMENT_CACHE_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
PRISM_PATCHES = REPO_ROOT / "devstack" / "prism-patches"

Component = Literal["kafka", "kafka-local", "gcp"]
"""The Java expansion services; ``kafka-local`` is KafkaIO with ``devstack/kafkaio-patches``, for local runners."""
SHADED_ARTIFACTS: dict[str, str] = {
    "kafka": "beam-sdks-java-io-expansion-service",
    "gcp": "beam-sdks-java-io-google-cloud-platform-expansion-service",
}
# The Beam release whose Prism we build, with our patches (devstack/prism-patches, rebased onto it). It may be
# newer than the apache-beam pin: 2.77.0 schedules stateful consumers on data alone once something
# self-checkpoints (apache/beam#39572) and parks SDF residuals until their resume delay (apache/beam#39849).
# Changing it means rebasing the patches; scripts/fetch-beam-artifacts refuses a patch that does not apply.
PRISM_VERSION = "2.77.0"
_BEAM_PIN = re.compile(r"^apache-beam(\[[a-z,]+\])?==(?P<version>\S+)\s*$")


def cache_root() -> Path:
    """The root of every cache this project builds; read at each call so a test or script can move it."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "engagement-pipeline"


def beam_version() -> str:
    """The one Beam version: the pin in requirements.txt, or the installed SDK's where no checkout is near."""
    requirements = REPO_ROOT / "requirements.txt"
    if requirements.is_file():
        pins = [m["version"] for line in requirements.read_text().splitlines() if (m := _BEAM_PIN.match(line))]
        if len(pins) != 1:
            raise ValueError(f"expected exactly one apache-beam pin in {requirements}, found {len(pins)}")
        return pins[0]
    from importlib.metadata import version

    return version("apache-beam")


def prism_version() -> str:
    """The Beam version of the Prism runner we build: its own declaration, independent of the SDK pin."""
    return PRISM_VERSION


def prism_patches_digest() -> str:
    """Names the set of our Prism patches: a binary built without the current patches is never used."""
    patches = sorted(PRISM_PATCHES.glob("*.patch"), key=lambda path: str(path).encode())
    if not patches:
        return "none"
    return hashlib.sha256(b"".join(path.read_bytes() for path in patches)).hexdigest()[:12]


def prism_dir() -> Path:
    return cache_root() / "prism" / f"{prism_version()}-{prism_patches_digest()}"


def prism_binary() -> Path:
    return prism_dir() / "prism"


def stale_prism_builds() -> list[Path]:
    """Builds of another Prism version or another set of patches: nothing may use them, so they can go."""
    current = prism_dir()
    builds = cache_root() / "prism"
    if not builds.is_dir():
        return []
    return sorted(path for path in builds.iterdir() if path.is_dir() and path != current)


def shaded_jar(component: Component, version: str | None = None) -> Path:
    """Where Beam looks up its released expansion-service jar (``JavaJarServer``'s jar cache)."""
    jar = f"{SHADED_ARTIFACTS[component]}-{version or beam_version()}.jar"
    return Path.home() / ".apache_beam" / "cache" / "jars" / jar


def assembled_service_dir(component: Component, version: str | None = None) -> Path:
    return cache_root() / "beam-java" / (version or beam_version()) / component


def assembled_jar(component: Component, version: str | None = None) -> Path:
    version = version or beam_version()
    return assembled_service_dir(component, version) / f"beam-{component}-expansion-service-{version}.jar"


def bigquery_emulator_dir() -> Path:
    return cache_root() / "bigquery-emulator"


def jvm_dir() -> Path:
    return cache_root() / "jvm"


_COMMANDS = {
    "cache-root": lambda args: cache_root(),
    "beam-version": lambda args: beam_version(),
    "prism-version": lambda args: prism_version(),
    "prism-dir": lambda args: prism_dir(),
    "prism-binary": lambda args: prism_binary(),
    "stale-prism-builds": lambda args: "\n".join(str(path) for path in stale_prism_builds()),
    "shaded-jar": lambda args: shaded_jar(args[0], *args[1:2]),
    "assembled-dir": lambda args: assembled_service_dir(args[0], *args[1:2]),
    "assembled-jar": lambda args: assembled_jar(args[0], *args[1:2]),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: {Path(__file__).name} {{{','.join(_COMMANDS)}}} [component [version]]", file=sys.stderr)
        return 2
    result = str(_COMMANDS[argv[0]](argv[1:]))
    if result:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
