"""Kafka Connect (standalone) running the Debezium PostgreSQL connector.

Standalone mode keeps source offsets in a file under the stack's data directory, so a restarted worker
resumes from its replication slot instead of snapshotting again.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from devstack import jvm, kafka, postgres
from devstack.config import StackConfig
from devstack.process import StackError, ensure_port_free, running_pid, spawn, wait_for_service
from devstack.process import stop as stop_process

NAME = "connect"
CONNECTOR = "engagement-cdc"
TOPIC_PREFIX = "cdc"
TABLES = ("public.engagement_events", "public.content")
PUBLICATION = "engagement_cdc"


def topic_for(table: str) -> str:
    """Debezium's topic naming: <topic.prefix>.<schema>.<table>."""
    return f"{TOPIC_PREFIX}.{table}"


def schemas_enabled() -> bool:
    """STACK_CDC_SCHEMAS=true wraps each record as {"schema", "payload"}; the default is the bare envelope."""
    value = os.environ.get("STACK_CDC_SCHEMAS", "false").strip().lower()
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise StackError(f"STACK_CDC_SCHEMAS must be true or false, not {value!r}")
    return value in {"true", "1", "yes"}


def slot_name(cfg: StackConfig) -> str:
    # Slot names allow [a-z0-9_] and 63 bytes; the hash keeps two checkouts on one server apart.
    digest = hashlib.sha1(str(cfg.stack_dir).encode()).hexdigest()[:10]  # noqa: S324 - a name, not security
    return f"engagement_cdc_{digest}"


def _home(cfg: StackConfig) -> Path:
    return cfg.data_dir / "connect"


def _offsets_file(cfg: StackConfig) -> Path:
    return _home(cfg) / "offsets.dat"


def install(cfg: StackConfig) -> None:
    jvm.ensure_artifacts(cfg)


def _properties(settings: dict[str, object]) -> str:
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def worker_config(cfg: StackConfig, artifacts: jvm.JvmArtifacts) -> dict[str, object]:
    schemas = str(schemas_enabled()).lower()
    return {
        "bootstrap.servers": cfg.kafka_bootstrap,
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": schemas,
        "value.converter.schemas.enable": schemas,
        "offset.storage.file.filename": _offsets_file(cfg),
        # Flush often so a restart re-delivers seconds, not minutes, of changes.
        "offset.flush.interval.ms": 1000,
        "listeners": f"http://127.0.0.1:{cfg.connect_port}",
        "rest.advertised.host.name": "127.0.0.1",
        "rest.advertised.port": cfg.connect_port,
        "plugin.path": artifacts.plugin_path,
        # Debezium's plugin ships ServiceLoader manifests, so scanning every jar's classes is not needed.
        "plugin.discovery": "service_load",
        # Connect's producer sends one request at a time (max.in.flight 1), each batch at most 16 KB per partition
        # after 5 ms. Batches of up to 256 KB after 20 ms took Kafka and Connect from 0.24-0.28 to 0.21-0.22 of a
        # core at 3,000 changes/s alone, and from 0.38-0.39 to 0.25-0.36 beside the job (docs/benchmarks.md,
        # session 24); 20 ms is small beside the 100 ms poll interval below.
        "producer.linger.ms": 20,
        "producer.batch.size": 262144,
    }


def connector_config(cfg: StackConfig) -> dict[str, object]:
    return {
        "name": CONNECTOR,
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": 1,
        "database.hostname": "127.0.0.1",
        "database.port": cfg.pg_port,
        "database.user": postgres.ROLE,
        "database.password": postgres.PASSWORD,
        "database.dbname": postgres.DATABASE,
        "topic.prefix": TOPIC_PREFIX,
        "plugin.name": "pgoutput",
        # The publication is part of the schema (sql/postgres/002_cdc.sql), not something Debezium invents.
        "publication.name": PUBLICATION,
        "publication.autocreate.mode": "disabled",
        "slot.name": slot_name(cfg),
        "table.include.list": ",".join(TABLES),
        "snapshot.mode": "initial",
        # Lower than the 500 ms default: the Redis ranking has a 5 s end-to-end latency budget.
        "poll.interval.ms": 100,
    }


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    ensure_port_free(NAME, cfg.connect_port)
    artifacts = jvm.ensure_artifacts(cfg)
    home = _home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    worker = home / "worker.properties"
    worker.write_text(_properties(worker_config(cfg, artifacts)))
    connector = home / f"{CONNECTOR}.properties"
    connector.write_text(_properties(connector_config(cfg)))
    # Debezium creates a topic with a table's first change, so on a fresh stack the events topic would not
    # exist until the first event, and a job started before it (``scripts/run-local --no-generator``) fails:
    # KafkaIO cannot read a topic without partitions. The broker's default partition count, as Debezium's.
    for table in TABLES:
        kafka.ensure_topic(cfg.kafka_bootstrap, topic_for(table))
    # A worker killed without a clean shutdown can leave its walsender holding the slot for a while, and
    # offsets and slot must agree; see postgres.prepare_replication_slot.
    postgres.prepare_replication_slot(cfg, slot_name(cfg), fresh=not _offsets_file(cfg).exists())
    log4j = jvm.write_log4j2_config(
        home / "log4j2.xml",
        {
            "org.reflections": "ERROR",
            "org.apache.kafka.clients": "WARN",
            "org.apache.kafka.common.utils.AppInfoParser": "WARN",
            "org.eclipse.jetty": "WARN",
        },
    )
    argv = jvm.java_argv(
        artifacts, "org.apache.kafka.connect.cli.ConnectStandalone", [str(worker), str(connector)], log4j, heap="1g"
    )
    spawn(cfg, NAME, argv, cwd=home)


def connector_status(cfg: StackConfig) -> dict:
    url = f"http://127.0.0.1:{cfg.connect_port}/connectors/{CONNECTOR}/status"
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.load(response)


def _running(cfg: StackConfig) -> bool:
    try:
        status = connector_status(cfg)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # the worker is up but has not created the connector yet
            return False
        raise
    states = [status["connector"]["state"], *(task["state"] for task in status.get("tasks", []))]
    if "FAILED" in states:
        traces = [t.get("trace", "") for t in [status["connector"], *status.get("tasks", [])] if t.get("trace")]
        first_trace = traces[0].splitlines()[0] if traces else "no trace"
        raise StackError(f"connector {CONNECTOR} FAILED: {first_trace}")
    return bool(status.get("tasks")) and all(state == "RUNNING" for state in states)


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    """Ready = the REST API reports the connector and its task RUNNING."""
    wait_for_service(cfg, NAME, lambda: _running(cfg), f"Kafka Connect connector {CONNECTOR}", timeout)


def stop(cfg: StackConfig) -> None:
    # SIGTERM lets the worker commit offsets and close the replication connection, so the slot is free.
    stop_process(cfg, NAME, timeout=60.0)


def endpoint(cfg: StackConfig) -> str:
    topics = ", ".join(topic_for(t) for t in TABLES)
    return f"http://127.0.0.1:{cfg.connect_port} (connector {CONNECTOR}, slot {slot_name(cfg)}, topics {topics})"
