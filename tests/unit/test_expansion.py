"""Choosing the Java expansion service: an address, a jar, or the jar fetched for this Beam version."""

import os

import apache_beam
import pytest
from apache_beam.transforms.external import JavaJarExpansionService

from transforms import expansion

OPTIONS = "JDK_JAVA_OPTIONS"


def test_an_address_is_used_as_given():
    assert expansion.java_expansion_service("10.0.0.5:8097", "kafka") == "10.0.0.5:8097"


def test_a_jar_path_starts_that_jar(tmp_path):
    jar = tmp_path / "service.jar"
    jar.write_bytes(b"PK")
    service = expansion.java_expansion_service(str(jar), "gcp")
    assert isinstance(service, JavaJarExpansionService)
    assert service.path_to_jar == str(jar)
    assert service._extra_args is None


def test_the_loopback_worker_is_asked_for_only_when_wanted(tmp_path):
    jar = tmp_path / "service.jar"
    jar.write_bytes(b"PK")
    service = expansion.java_expansion_service(str(jar), "kafka", loopback_worker=True)
    assert service._extra_args == ["{{PORT}}", "--alsoStartLoopbackWorker"]


def test_by_default_the_jar_fetched_for_this_beam_version(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    version = apache_beam.__version__
    jar = tmp_path / "beam-java" / version / "kafka" / f"beam-kafka-expansion-service-{version}.jar"
    with pytest.raises(FileNotFoundError, match="run scripts/fetch-beam-artifacts kafka"):
        expansion.java_expansion_service(None, "kafka")
    jar.parent.mkdir(parents=True)
    jar.write_bytes(b"PK")
    assert expansion.java_expansion_service("", "kafka").path_to_jar == str(jar)


def test_a_local_runner_reads_kafka_with_our_patched_kafkaio_only(tmp_path, monkeypatch):
    # The loopback worker runs KafkaIO's classes from the service's own jar: locally that must be the
    # assembly with devstack/kafkaio-patches, never Beam's released jar, even when that one was fetched.
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    version = apache_beam.__version__
    jars = tmp_path / "home" / ".apache_beam" / "cache" / "jars"
    released = jars / f"beam-sdks-java-io-expansion-service-{version}.jar"
    released.parent.mkdir(parents=True)
    released.write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="run scripts/fetch-beam-artifacts kafka-local"):
        expansion.java_expansion_service(None, "kafka", loopback_worker=True)
    patched = tmp_path / "beam-java" / version / "kafka-local" / f"beam-kafka-local-expansion-service-{version}.jar"
    patched.parent.mkdir(parents=True)
    patched.write_bytes(b"PK")
    assert expansion.java_expansion_service(None, "kafka", loopback_worker=True).path_to_jar == str(patched)
    # Dataflow's launcher expands with the released jar: its Java workers bring their own KafkaIO.
    assert expansion.java_expansion_service(None, "kafka").path_to_jar == str(released)


def test_expanding_for_dataflow_falls_back_to_the_local_assembly(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGAGEMENT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    version = apache_beam.__version__
    patched = tmp_path / "beam-java" / version / "kafka-local" / f"beam-kafka-local-expansion-service-{version}.jar"
    patched.parent.mkdir(parents=True)
    patched.write_bytes(b"PK")
    assert expansion.fetched_jar("kafka") == patched


def test_the_loopback_jvm_starts_with_c1_only_and_the_environment_is_restored(tmp_path, monkeypatch):
    jar = tmp_path / "service.jar"
    jar.write_bytes(b"PK")
    seen: list[str | None] = []
    monkeypatch.setattr(JavaJarExpansionService, "__enter__", lambda self: seen.append(os.environ.get(OPTIONS)))
    monkeypatch.setenv(OPTIONS, "-Xmx1g")
    expansion.java_expansion_service(str(jar), "kafka", loopback_worker=True).__enter__()
    expansion.java_expansion_service(str(jar), "gcp").__enter__()
    assert seen == [f"-Xmx1g {expansion.LOOPBACK_JVM_OPTIONS}", "-Xmx1g"]
    assert os.environ[OPTIONS] == "-Xmx1g"
    monkeypatch.delenv(OPTIONS)
    expansion.java_expansion_service(str(jar), "kafka", loopback_worker=True).__enter__()
    assert seen[-1] == expansion.LOOPBACK_JVM_OPTIONS
    assert OPTIONS not in os.environ
