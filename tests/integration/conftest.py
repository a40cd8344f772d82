"""Fixtures for tests against the real local stack (``scripts/stack``).

The ``stack`` fixture starts whatever is not running yet (a cold machine installs packages and jars first,
which takes minutes) and leaves the stack running afterwards, so the next session starts in seconds; stop it
with ``scripts/stack down``. Tests must therefore tolerate data left by earlier runs: use unique ids.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition
from google.cloud import bigquery

from devstack import bigquery_clients
from devstack.cli import ensure_tables, ensure_up
from devstack.config import StackConfig, load_config
from devstack.external_api import ApiServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs the stack; the marker lets `-m "not integration"` skip it.
    for item in items:
        if "tests/integration/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack() -> StackConfig:
    """The whole running local stack (started on demand, left running)."""
    cfg = load_config()
    ensure_up(cfg)
    return cfg


@pytest.fixture(scope="session")
def cdc_stack() -> StackConfig:
    """Only PostgreSQL, Kafka, Connect (Debezium) and Redis: what the CDC path needs, so these tests neither
    wait for nor depend on the BigQuery emulator and the HTTP API."""
    cfg = load_config()
    ensure_up(cfg, ["postgres", "kafka", "connect", "redis"])
    return cfg


@pytest.fixture
def pg_conn(cdc_stack: StackConfig) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit connection as the application role: each statement is visible to CDC at once."""
    conn = psycopg2.connect(cdc_stack.pg_dsn)
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


class TopicTail:
    """Reads what is written to a topic after the tail was opened (earlier history is skipped).

    Opened before the rows are written, so no record can slip between "written" and "subscribed". Assigns
    partitions by hand at their current end offsets rather than joining a consumer group: no rebalance
    delay, and no committed offsets left behind by the tests. A topic that does not exist yet (Debezium
    creates its topics with the first change) is read from its beginning once it appears.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"integration-tests-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                # A test must never create a topic as a side effect of reading it.
                "allow.auto.create.topics": False,
            }
        )
        self._assigned = self._assign(at_end=True)

    def _assign(self, at_end: bool) -> bool:
        metadata = self._consumer.list_topics(self.topic, timeout=10)
        topic = metadata.topics.get(self.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            return False
        partitions = []
        for partition in topic.partitions:
            if at_end:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=10)
                partitions.append(TopicPartition(self.topic, partition, high))
            else:
                partitions.append(TopicPartition(self.topic, partition, 0))
        self._consumer.assign(partitions)
        return True

    def collect(
        self, predicate: Callable[[dict[str, Any]], bool], count: int, timeout: float = 60.0
    ) -> list[dict[str, Any]]:
        """The first ``count`` records whose decoded message satisfies ``predicate``.

        Each message is ``{"key": ..., "value": ..., "partition": ..., "offset": ...}`` with key and value
        JSON-decoded (a tombstone's value is None).
        """
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            if not self._assigned:
                self._assigned = self._assign(at_end=False)
                if not self._assigned:
                    time.sleep(0.2)
                    continue
            message = self._consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise RuntimeError(f"consuming {self.topic}: {message.error()}")
            decoded = {
                "key": json.loads(message.key()) if message.key() is not None else None,
                "value": json.loads(message.value()) if message.value() is not None else None,
                "partition": message.partition(),
                "offset": message.offset(),
            }
            if predicate(decoded):
                found.append(decoded)
        if len(found) < count:
            raise AssertionError(f"only {len(found)} of {count} expected records arrived on {self.topic} in {timeout}s")
        return found

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def topic_tail(cdc_stack: StackConfig) -> Iterator[Callable[[str], TopicTail]]:
    """Factory: ``topic_tail("cdc.public.content")`` opens a TopicTail, closed after the test."""
    tails: list[TopicTail] = []

    def open_tail(topic: str) -> TopicTail:
        tail = TopicTail(cdc_stack.kafka_bootstrap, topic)
        tails.append(tail)
        return tail

    yield open_tail
    for tail in tails:
        tail.close()


@pytest.fixture(scope="module")
def bq(stack: StackConfig) -> bigquery.Client:
    """A REST client of the BigQuery emulator."""
    return bigquery_clients.rest_client(stack.bq_rest_endpoint, stack.bq_project)


@pytest.fixture(scope="module")
def dataset(stack: StackConfig, bq: bigquery.Client) -> Iterator[str]:
    """A fresh dataset with the project's tables and views (scripts/bigquery-ddl), deleted afterwards, so
    each test module starts empty however often the suite runs against the same emulator."""
    name = f"it_{uuid.uuid4().hex[:12]}"
    ensure_tables(stack, name)
    yield name
    bq.delete_dataset(f"{stack.bq_project}.{name}", delete_contents=True, not_found_ok=True)


@pytest.fixture
def private_api(stack: StackConfig) -> Iterator[StackConfig]:
    """The stack with an HTTP API of the test's own: the stand-in API's code, on a free port.

    Other jobs reading the shared CDC topic (scripts/run-local, other tests) post a test's events to the
    shared API too, and may inject faults there; a private instance keeps "each event once" exact.
    """
    server = ApiServer(("127.0.0.1", 0), stack.http_api_token)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield dataclasses.replace(stack, http_api_port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
