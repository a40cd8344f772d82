"""A streaming job told to start at a time no record of its topic has reached yet (a first run, a resume after a
quiet spell, ``scripts/run-local --no-generator`` on a fresh stack) starts at each partition's end and reads what
comes next. Beam's KafkaIO fails the read instead (apache/beam#21610); devstack/kafkaio-patches/0002 is the fix
the local runners use.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from devstack import kafka
from devstack.generator import KafkaJsonSink, KafkaRecord, Kind
from tests.integration.test_streaming_end_to_end import (
    StreamingJob,
    bigquery_rows,
    insert_content,
    job_args,
    wait_for,
)

pytestmark = pytest.mark.integration

EVENTS = 12


def test_a_job_started_past_every_record_of_its_topic_reads_what_comes_next(private_api, dataset, bq, tmp_path) -> None:
    cfg = private_api
    run_id = uuid.uuid4().hex[:10]
    topic, prefix, group = f"start-{run_id}", f"start-{run_id}", f"start-{run_id}"
    content_id = insert_content(cfg.pg_dsn, "Start", "podcast")
    # An empty topic: no partition holds a record at or after any start time.
    assert kafka.ensure_topic(cfg.kafka_bootstrap, topic, partitions=2)

    started = datetime.now(UTC) - timedelta(seconds=2)
    args = [*job_args(cfg, dataset, prefix, group, started), "--cdc_topic=", f"--json_topic={topic}"]
    job = StreamingJob(args, tmp_path / "job.log", cfg.http_api_token)
    try:
        # KafkaIO seeks each partition once it has turned the start time into an offset, the step that failed.
        wait_for("the job reading both partitions", lambda: _reading(job.log(), topic) == {0, 1}, 240, [job])

        first_id = 2**52 + int(time.time() * 1000) * 1000
        now = datetime.now(UTC)
        records = [
            KafkaRecord(
                Kind.NORMAL,
                str(event_id).encode(),
                json.dumps(
                    {
                        "id": event_id,
                        "content_id": content_id,
                        "user_id": None,
                        "event_type": "play",
                        "event_ts": int(now.timestamp() * 1000),
                        "duration_ms": 1000,
                    }
                ).encode(),
                event_id,
                content_id,
            )
            for event_id in range(first_id, first_id + EVENTS)
        ]
        sink = KafkaJsonSink(cfg.kafka_bootstrap, topic, partitions=2)
        sink.send(records)
        sink.close()

        sql = f"SELECT event_id FROM `DATASET.enriched_events` WHERE event_id >= {first_id}"

        def written() -> list[int]:
            return sorted(row["event_id"] for row in bigquery_rows(bq, cfg, dataset, sql))

        wait_for("the events written after the start in BigQuery", lambda: len(written()) >= EVENTS, 180, [job])
        assert written() == list(range(first_id, first_id + EVENTS))
    finally:
        job.stop()


def _reading(log: str, topic: str) -> set[int]:
    """The partitions of ``topic`` KafkaIO has started reading, from its consumer's seek log lines."""
    marker = f"for partition {topic}-"
    return {int(line.split(marker, 1)[1].split()[0]) for line in log.splitlines() if marker in line}
