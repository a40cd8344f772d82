"""Apache Kafka 4 in KRaft mode: one combined broker/controller, jars from Maven Central."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import struct
import uuid
from pathlib import Path

from devstack import jvm
from devstack.config import StackConfig
from devstack.process import StackError, ensure_port_free, run_logged, running_pid, say, spawn, wait_for_service
from devstack.process import stop as stop_process

NAME = "kafka"
NODE_ID = 1


def _home(cfg: StackConfig) -> Path:
    return cfg.data_dir / "kafka"


def _log_dirs(cfg: StackConfig) -> Path:
    """Kafka calls its data "logs"; these are the partitions, not the service log (that is logs/kafka.log)."""
    return _home(cfg) / "data"


def install(cfg: StackConfig) -> None:
    jvm.ensure_artifacts(cfg)


def _server_properties(cfg: StackConfig) -> str:
    broker = f"127.0.0.1:{cfg.kafka_port}"
    controller = f"127.0.0.1:{cfg.kafka_controller_port}"
    settings = {
        "process.roles": "broker,controller",
        "node.id": NODE_ID,
        "controller.quorum.bootstrap.servers": controller,
        "listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
        "advertised.listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": _log_dirs(cfg),
        # One node: every replication factor and ISR minimum is 1.
        "default.replication.factor": 1,
        "min.insync.replicas": 1,
        "offsets.topic.replication.factor": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        # Fewer internal partitions than the production defaults (50) keep first use and restarts quick.
        "offsets.topic.num.partitions": 8,
        "transaction.state.log.num.partitions": 8,
        # Topics appear on first use (Debezium's, the pipeline's) with enough partitions to exercise parallelism.
        "auto.create.topics.enable": "true",
        "num.partitions": 4,
        "group.initial.rebalance.delay.ms": 0,
        "log.retention.hours": 168,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _random_cluster_id() -> str:
    """Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.

    Never one that starts with "-": the storage tool would read it as an option and fail the format ("argument
    --cluster-id/-t: expected one argument"), one fresh stack in 64. Kafka's own ``Uuid.randomUuid`` skips those
    for the same reason."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(cfg: StackConfig, artifacts: jvm.JvmArtifacts, properties: Path, log4j: Path) -> None:
    """Format the KRaft storage once; again only if the controller address it was formatted with changed.

    ``--standalone`` writes the controller's endpoint into the initial voter set, so a data directory
    formatted for one port offset would not form a quorum under another.
    """
    stamp = _home(cfg) / "formatted.json"
    wanted = {"controller": f"127.0.0.1:{cfg.kafka_controller_port}"}
    meta = _log_dirs(cfg) / "meta.properties"
    if meta.exists():
        try:
            if json.loads(stamp.read_text()).get("controller") == wanted["controller"]:
                return
        except (FileNotFoundError, ValueError):
            pass
        say(f"kafka: controller address changed; discarding the old Kafka data in {_log_dirs(cfg)}")
        shutil.rmtree(_log_dirs(cfg))
    argv = jvm.java_argv(
        artifacts,
        "kafka.tools.StorageTool",
        ["format", "--standalone", "--cluster-id", _random_cluster_id(), "--config", str(properties)],
        log4j,
        heap="256m",
    )
    run_logged(argv, cfg.log_dir / f"{NAME}.log", "formatting Kafka's KRaft storage")
    stamp.write_text(json.dumps(wanted))


def start(cfg: StackConfig) -> None:
    if running_pid(cfg, NAME) is not None:
        return
    ensure_port_free(NAME, cfg.kafka_port)
    ensure_port_free(NAME, cfg.kafka_controller_port)
    artifacts = jvm.ensure_artifacts(cfg)
    home = _home(cfg)
    home.mkdir(parents=True, exist_ok=True)
    properties = home / "server.properties"
    properties.write_text(_server_properties(cfg))
    log4j = jvm.write_log4j2_config(
        home / "log4j2.xml",
        # The request logger and the controller's per-record chatter drown out everything useful locally.
        {"kafka.request.logger": "WARN", "org.apache.kafka.controller": "WARN", "kafka.controller": "WARN"},
    )
    _format_storage(cfg, artifacts, properties, log4j)
    spawn(cfg, NAME, jvm.java_argv(artifacts, "kafka.Kafka", [str(properties)], log4j, heap="1g"), cwd=home)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def api_versions_ok(port: int, timeout: float = 2.0) -> bool:
    """Send a Kafka ApiVersions (v0) request; a broker answers it only once it serves client requests.

    Hand-rolled so that readiness needs no Kafka client library: the request is a 4-byte size followed by
    api_key=18, api_version=0, a correlation id and a client id; the answer starts with that correlation id
    and an error code.
    """
    client_id = b"stack-probe"
    correlation_id = 7
    request = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        body = _recv_exact(sock, size)
    answered_id, error_code = struct.unpack(">ih", body[:6])
    return answered_id == correlation_id and error_code == 0


def wait_ready(cfg: StackConfig, timeout: float) -> None:
    wait_for_service(cfg, NAME, lambda: api_versions_ok(cfg.kafka_port), f"Kafka on {cfg.kafka_bootstrap}", timeout)


def stop(cfg: StackConfig) -> None:
    # SIGTERM makes the broker shut down cleanly (no log recovery on the next start); give it time.
    stop_process(cfg, NAME, timeout=60.0)


def ensure_topic(bootstrap: str, topic: str, partitions: int = -1, config: dict[str, str] | None = None) -> bool:
    """Creates ``topic`` unless it exists (``partitions`` -1: the broker's ``num.partitions``); True if created.

    An existing topic is left as it is configured. A concurrent creator winning the race is fine."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        topics = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise StackError(f"cannot reach Kafka at {bootstrap} ({exc})") from exc
    if topic in topics:
        return False
    try:
        futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, config=config or {})])
        futures[topic].result(timeout=30)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise StackError(f"cannot create the Kafka topic {topic} at {bootstrap}: {exc}") from exc
    return True


def endpoint(cfg: StackConfig) -> str:
    return f"{cfg.kafka_bootstrap} (KRaft broker+controller, controller on :{cfg.kafka_controller_port})"
