"""Issue 16 on the real stack: the streaming job on Prism reads every poison record of the report, mixed with
valid events, and stays up; each poison record is in the dead letters exactly once, at its Kafka position,
skips are not, and every valid event reaches BigQuery and the HTTP API exactly once.

The records are built by the generator's fuzz mode (``devstack.generator.poison_record``) and published to a
topic of the test's own, which the job reads as its ``--json_topic``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from devstack.generator import (
    FUZZ_MAX_MESSAGE_BYTES,
    POISON_KINDS,
    POISON_OUTCOMES,
    KafkaJsonSink,
    KafkaRecord,
    Kind,
    poison_record,
)
from tests.integration.external_api import ExternalApiClient
from tests.integration.test_streaming_end_to_end import (
    StreamingJob,
    bigquery_rows,
    insert_content,
    job_args,
    wait_for,
)

pytestmark = pytest.mark.integration

VALID_EVENTS = 30
COPIES_PER_KIND = 2
SETTLE_SECONDS = 15  # after everything arrived: long enough for a retried bundle to write twice


def build_records(content_id: str, first_id: int, now: datetime) -> list[KafkaRecord]:
    """Valid events with each poison kind ``COPIES_PER_KIND`` times, interleaved."""
    rng = random.Random(16)
    kinds = [Kind.NORMAL] * VALID_EVENTS + [kind for kind in POISON_KINDS for _ in range(COPIES_PER_KIND)]
    rng.shuffle(kinds)
    records = []
    for index, kind in enumerate(kinds):
        event_id = first_id + index
        obj = {
            "id": event_id,
            "content_id": content_id,
            "user_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "event_type": "play",
            "event_ts": int((now - timedelta(seconds=rng.uniform(0, 2))).timestamp() * 1000),
            "duration_ms": 1000 + index,
            "device": "ios",
            "raw_payload": {"fuzz": index},
        }
        if kind is Kind.NORMAL:
            value = json.dumps(obj).encode()
            records.append(KafkaRecord(kind, str(event_id).encode(), value, event_id, content_id))
        else:
            key, value, carried_id = poison_record(kind, obj, rng)
            records.append(KafkaRecord(kind, key, value, carried_id, content_id))
    return records


def test_poison_records_are_dead_letters_and_the_job_stays_up(private_api, dataset, bq, tmp_path) -> None:
    cfg = private_api
    run_id = uuid.uuid4().hex[:10]
    topic, prefix, group = f"fuzz-{run_id}", f"fuzz-{run_id}", f"fuzz-{run_id}"
    content_id = insert_content(cfg.pg_dsn, "Fuzz", "video")
    # Ids far above the table's sequence (these events never become rows), distinct per run.
    first_id = 2**52 + int(time.time() * 1000) * 1000
    sink = KafkaJsonSink(
        cfg.kafka_bootstrap, topic, partitions=2, max_message_bytes=FUZZ_MAX_MESSAGE_BYTES, record_positions=True
    )

    started = datetime.now(UTC) - timedelta(seconds=2)
    # Only the test's topic: the shared CDC topic may carry other work's events (or not exist yet).
    args = [*job_args(cfg, dataset, prefix, group, started), "--cdc_topic=", f"--json_topic={topic}"]
    job = StreamingJob(args, tmp_path / "job.log", cfg.http_api_token)
    try:
        sink.send(build_records(content_id, first_id, datetime.now(UTC)))
        sink.close()
        positions = sink.positions
        assert positions is not None
        assert len(positions) == VALID_EVENTS + len(POISON_KINDS) * COPIES_PER_KIND

        expected_events = sorted(
            record.event_id
            for record, _, _ in positions
            if record.kind is Kind.NORMAL or POISON_OUTCOMES.get(record.kind) == "event"
        )
        expected_dead = {
            (partition, offset): record.kind
            for record, partition, offset in positions
            if record.kind.poison and POISON_OUTCOMES[record.kind] == "dead_letter"
        }
        ids = ",".join(map(str, expected_events))
        events_sql = f"SELECT event_id FROM `DATASET.enriched_events` WHERE event_id IN ({ids})"
        dead_sql = (
            "SELECT source_partition, source_offset, reason, stage, LENGTH(payload_bytes) AS size"
            f" FROM `DATASET.dead_letters` WHERE source_topic = '{topic}'"
        )
        api = ExternalApiClient(cfg)

        def events() -> list[int]:
            return sorted(row["event_id"] for row in bigquery_rows(bq, cfg, dataset, events_sql))

        def dead() -> list[dict]:
            return bigquery_rows(bq, cfg, dataset, dead_sql)

        wait_for("every valid event in BigQuery", lambda: len(set(events())) == len(expected_events), 300, [job])
        wait_for("every poison record in the dead letters", lambda: len(dead()) >= len(expected_dead), 120, [job])
        wait_for(
            "every valid event at the HTTP API",
            lambda: all(count >= 1 for count in api.receipts(expected_events).values()),
            120,
            [job],
        )
        time.sleep(SETTLE_SECONDS)
        assert job.process.poll() is None, f"the job stopped:\n{job.log()[-4000:]}"

        # Exactly once, each at its own Kafka position, with the reason of its kind.
        assert events() == expected_events
        assert api.receipts(expected_events) == dict.fromkeys(expected_events, 1)
        letters = dead()
        found = sorted((row["source_partition"], row["source_offset"]) for row in letters)
        assert found == sorted(expected_dead), "\n".join(f"{r['source_offset']}: {r['reason']}" for r in letters)
        reasons = {(row["source_partition"], row["source_offset"]): row for row in letters}
        for position, kind in expected_dead.items():
            letter = reasons[position]
            assert letter["stage"] == "decode", (kind, letter)
            if kind is Kind.POISON_TOO_LARGE:
                assert letter["reason"].startswith("too large: 2000"), letter["reason"]
                assert letter["size"] == 65_536
            if kind is Kind.POISON_DEEP_NESTING:
                assert letter["reason"].startswith("too deeply nested"), letter["reason"]
        assert "Traceback" not in job.log(), job.log()[-4000:]
    finally:
        job.stop()
