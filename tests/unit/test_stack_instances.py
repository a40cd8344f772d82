"""The suite and the benchmarks run on stacks of their own, never on the one scripts/run-local shows."""

import dataclasses

import pytest

from devstack import config

PORTS = [f.name for f in dataclasses.fields(config.StackConfig) if f.name.endswith("_port")]


def config_of(monkeypatch, instance: str) -> config.StackConfig:
    with monkeypatch.context() as scoped:
        scoped.setenv(config.INSTANCE_ENV, instance)
        return config.load_config()


def test_this_suite_runs_on_the_test_instance():
    # tests/conftest.py selects it before any test module reads the configuration.
    cfg = config.load_config()
    assert config.instance()[0] == "test"
    assert cfg.stack_dir.name == ".stack-test"


@pytest.mark.parametrize("instance", ["test", "bench", "faults"])
def test_an_instance_shares_no_port_and_no_directory_with_the_developers_stack(monkeypatch, instance):
    monkeypatch.delenv("STACK_DIR", raising=False)
    developer, other = config_of(monkeypatch, "dev"), config_of(monkeypatch, instance)
    assert developer.stack_dir != other.stack_dir
    developer_ports = {getattr(developer, name) for name in PORTS}
    assert not developer_ports & {getattr(other, name) for name in PORTS}


def test_switching_instance_drops_the_directory_of_the_other_one(monkeypatch):
    monkeypatch.setenv(config.INSTANCE_ENV, "dev")
    monkeypatch.setenv("STACK_DIR", "/somewhere/.stack")
    config.use_instance("bench")
    assert config.load_config().stack_dir.name == ".stack-bench"


def test_an_unknown_instance_is_refused(monkeypatch):
    monkeypatch.setenv(config.INSTANCE_ENV, "prod")
    with pytest.raises(ValueError, match="expected one of dev, test, bench"):
        config.load_config()


def test_a_kafka_cluster_id_never_starts_with_a_dash_which_the_storage_tool_reads_as_an_option(monkeypatch):
    import uuid

    from devstack import kafka

    # 0xF8 makes the first base64 character "-"; the second draw is an ordinary id.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = kafka._random_cluster_id()
    assert cluster_id == "AQEBAQEBAQEBAQEBAQEBAQ"
    assert len(cluster_id) == 22
