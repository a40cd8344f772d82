"""Choosing the Java expansion service: an address, a jar, or the jar fetched for this Beam version."""

import apache_beam
import pytest
from apache_beam.transforms.external import JavaJarExpansionService

from transforms import expansion


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
