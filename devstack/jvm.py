"""Java and the Maven-resolved jars shared by the Kafka broker and the Kafka Connect worker."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tarfile
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from devstack.apt import ensure_apt_packages
from devstack.config import StackConfig
from devstack.process import StackError, run_logged, say
from transforms import artifacts as artifact_paths

POM = Path(__file__).resolve().parent / "maven" / "pom.xml"
MIN_JAVA = 17

_resolve_lock = threading.Lock()


@dataclass(frozen=True)
class JvmArtifacts:
    root: Path
    kafka_version: str
    debezium_version: str

    @property
    def libs(self) -> Path:
        return self.root / "libs"

    @property
    def plugin_path(self) -> Path:
        """Connect's ``plugin.path``: one sub-directory per plugin, each with its own class loader."""
        return self.root / "plugins"

    @property
    def classpath(self) -> str:
        return f"{self.libs}/*"


@cache
def pom_properties() -> dict[str, str]:
    """The versions pinned in the pom, so Python never repeats (and drifts from) them."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    project = ET.parse(POM).getroot()  # noqa: S314 - our own pom, not untrusted input
    props = project.find("m:properties", ns)
    if props is None:
        raise StackError(f"{POM} has no <properties>")
    return {child.tag.split("}", 1)[1]: (child.text or "").strip() for child in props}


def _java_major(java: str) -> int | None:
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if not match:
        return None
    major = int(match.group(1))
    # Java 8 and older report "1.8".
    return int(match.group(2) or 0) if major == 1 else major


def java_binary() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def ensure_java(cfg: StackConfig) -> str:
    java = java_binary()
    if java is None or (_java_major(java) or 0) < MIN_JAVA or shutil.which("mvn") is None:
        # default-jre-headless is 17 on Debian 12 and newer on later releases; Kafka 4 needs >= 17.
        ensure_apt_packages(cfg, ["default-jre-headless", "maven"], "Kafka and Kafka Connect")
        java = java_binary()
    if java is None:
        raise StackError("java is not installed")
    major = _java_major(java)
    if major is None or major < MIN_JAVA:
        raise StackError(f"Kafka 4 needs Java {MIN_JAVA}+, but {java} is Java {major}; set JAVA_HOME to a newer JDK")
    return java


def ensure_artifacts(cfg: StackConfig) -> JvmArtifacts:
    """Resolve the jars once per pom content; later calls (and later `up`s) return the cached directory."""
    props = pom_properties()
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    root = artifact_paths.jvm_dir() / f"kafka-{props['kafka.version']}-debezium-{props['debezium.version']}-{digest}"
    artifacts = JvmArtifacts(root, props["kafka.version"], props["debezium.version"])
    with _resolve_lock:
        if (root / ".complete").exists():
            return artifacts
        ensure_java(cfg)
        say(
            f"resolving Kafka {artifacts.kafka_version} and Debezium {artifacts.debezium_version} jars from "
            f"Maven Central into {root} (first time only)"
        )
        # Build next to the final place and rename, so an interrupted run never looks complete and two
        # checkouts sharing the cache cannot see each other's half-written directory.
        staging = root.with_name(f"{root.name}.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        downloads = staging / "downloads"
        run_logged(
            [
                "mvn",
                "-B",
                "-f",
                POM,
                "package",
                f"-Dstack.libs.dir={staging / 'libs'}",
                f"-Dstack.plugins.dir={downloads}",
            ],
            cfg.log_dir / "install-maven.log",
            "resolving jars with Maven",
        )
        for archive in sorted(downloads.glob("*.tar.gz")):
            with tarfile.open(archive) as tar:
                tar.extractall(staging / "plugins", filter="data")
        shutil.rmtree(downloads)
        (staging / ".complete").write_text(f"resolved from {POM}\n")
        try:
            staging.rename(root)
        except OSError:
            # Another process finished first; its result is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
            if not (root / ".complete").exists():
                raise
        return artifacts


def write_log4j2_config(path: Path, quiet: dict[str, str] | None = None) -> Path:
    """Console-only logging: the stack's process helper already sends stdout to logs/<service>.log."""
    loggers = "\n".join(f'    <Logger name="{name}" level="{level}"/>' for name, level in sorted((quiet or {}).items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by devstack/jvm.py on every start. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d{{ISO8601}}] %-5p %m (%c{{1}})%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="stdout"/></Root>
{loggers}
  </Loggers>
</Configuration>
"""
    )
    return path


def java_argv(
    artifacts: JvmArtifacts,
    main_class: str,
    args: list[str],
    log4j_config: Path,
    heap: str = "768m",
) -> list[str]:
    java = java_binary() or "java"
    return [
        java,
        "-Xms128m",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp",
        artifacts.classpath,
        main_class,
        *args,
    ]
