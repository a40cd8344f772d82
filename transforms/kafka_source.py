"""Reading raw records from Kafka with Beam's KafkaIO (a Java cross-language transform).

KafkaIO hands over bytes and coordinates only; event time comes from the payload (``DecodeRecords``
re-timestamps each event with its ``event_ts``), never from Kafka's CreateTime.

``--kafka_start_offsets`` lets an operator start past given offsets, per partition (docs/restarts.md).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.expansion import java_expansion_service
from transforms.model import RawRecord, SourceCoordinates
from transforms.settings import add_options, option_values, parse_bool, setting

_START_KEYWORDS = ("earliest", "latest")

_log = logging.getLogger(__name__)

PartitionOffsets = Mapping[tuple[str, int], int]
"""(topic, partition) -> the first offset the job processes in that partition."""


_PROPERTY = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*=(.*)$")


def _empty_as_none(text: str) -> str | None:
    return text or None


def parse_consumer_properties(entries: Sequence[str]) -> dict[str, str]:
    """``["security.protocol=SASL_SSL", ...]`` -> a dict; a value may itself contain '='."""
    properties = {}
    for entry in entries:
        match = _PROPERTY.match(entry)
        if match is None:
            raise ValueError(f"--kafka_consumer_config expects KEY=VALUE, got {entry!r}")
        properties[match.group(1)] = match.group(2)
    return properties


class KafkaReadOptions(PipelineOptions):
    """Where and how the streaming job reads Kafka (``KafkaReadSettings`` declares most of it)."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--cdc_topic",
            default="cdc.public.engagement_events",
            help="Topic of Debezium change events for engagement_events (any of the three JSON shapes).",
        )
        parser.add_argument(
            "--json_topic",
            default="",
            help="Optional topic of plain JSON events published by applications; empty to read none.",
        )
        parser.add_argument(
            "--kafka_start_offsets",
            default="",
            help=(
                "Start past given offsets: comma-separated PARTITION:OFFSET (when one topic is read) or "
                "TOPIC:PARTITION:OFFSET, e.g. 0:1234,1:99. OFFSET is the first one processed; records of that "
                "partition below it are skipped, counted (kafka/skipped_before_start_offset) and logged with "
                "their offsets. Reading itself starts as --start_offset says. Partitions not listed are "
                "unaffected. For a record that must not be processed (docs/restarts.md)."
            ),
        )
        add_options(parser, KafkaReadSettings)


@dataclass(frozen=True)
class KafkaReadSettings:
    """Validated KafkaIO settings; the options of ``KafkaReadOptions`` are declared here."""

    bootstrap_servers: str = setting(
        flag="--bootstrap_servers",
        option_default="127.0.0.1:29092",
        help="Kafka bootstrap servers, comma-separated host:port pairs.",
    )
    topics: tuple[str, ...]
    """``--cdc_topic`` and ``--json_topic``, the empty ones left out."""
    consumer_group: str = setting(
        "engagement-pipeline",
        flag="--consumer_group",
        help="Kafka consumer group id; offsets are committed under it when --commit_offsets is on.",
    )
    start_offset: str = setting(
        "earliest",
        flag="--start_offset",
        help=(
            "Where to start reading: 'earliest' or 'latest' (used when the consumer group has no committed "
            "offset; otherwise the group's offsets), an ISO-8601 time with offset (e.g. "
            "2026-11-22T10:00:00Z; every partition starts there, whatever the group committed), or, for the "
            "streaming job, 'resume': restart where the sinks show the last run stopped (docs/restarts.md)."
        ),
    )
    commit_offsets: bool = setting(
        True,
        flag="--commit_offsets",
        type=parse_bool,
        help="Commit consumed offsets to Kafka when bundles are finalized (true/false).",
    )
    extra_config: Mapping[str, str] = setting(
        default_factory=dict,
        flag="--kafka_consumer_config",
        option_default=[],
        parse=parse_consumer_properties,
        action="append",
        metavar="KEY=VALUE",
        help=(
            "Extra Kafka consumer property, repeatable, passed through unchanged: e.g. "
            "security.protocol=SASL_SSL, sasl.mechanism=PLAIN, sasl.jaas.config=..."
        ),
    )
    max_records: int | None = setting(
        None,
        flag="--kafka_max_records",
        type=int,
        help="Stop after this many records (a bounded read, for tests and demos). Unset: read forever.",
    )
    max_read_seconds: int | None = setting(
        None,
        flag="--kafka_max_read_seconds",
        type=int,
        help="Stop reading after this many seconds (a bounded read, for tests and demos). Unset: forever.",
    )
    poll_timeout_seconds: int = setting(
        1,
        flag="--kafka_poll_timeout_seconds",
        type=int,
        help=(
            "Seconds of polling after which KafkaIO ends a partition's read and hands its records on "
            "(a whole number, at least 1; KafkaIO's own default is 2). Lower means lower latency and more, "
            "smaller bundles (docs/benchmarks.md). On the local runners every partition's read ends on the same "
            "whole multiple of it (devstack/kafkaio-patches)."
        ),
    )
    """KafkaIO's ``consumer_polling_timeout``: a partition's read ends after this much polling."""
    loopback_worker: bool = setting(
        False,
        flag="--kafka_java_loopback_worker",
        type=parse_bool,
        help=(
            "Run KafkaIO's Java worker inside its expansion service (true/false): for local runners "
            "without Docker such as Prism. Leave false on Dataflow, which runs its own Java workers."
        ),
    )
    expansion_service: str | None = setting(
        None,
        flag="--kafka_expansion_service",
        option_default="",
        parse=_empty_as_none,
        help=(
            "host:port of a running Java expansion service for KafkaIO, a jar path, or empty for the "
            "jar scripts/fetch-beam-artifacts fetched for this Beam version."
        ),
    )
    start_offsets: PartitionOffsets = field(default_factory=dict)
    """``--kafka_start_offsets``: records below these offsets are skipped."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers.strip():
            raise ValueError("--bootstrap_servers is required")
        if not self.topics:
            raise ValueError("at least one Kafka topic is required")
        if self.poll_timeout_seconds < 1:
            # KafkaIO polls while its budget is positive: 0 would end every read before its first poll.
            raise ValueError(f"--kafka_poll_timeout_seconds must be at least 1, not {self.poll_timeout_seconds}")
        for name, value in (("kafka_max_records", self.max_records), ("kafka_max_read_seconds", self.max_read_seconds)):
            # 0 would make a bounded read that ends at once (a console may prefill an empty NUMBER with 0).
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 when given (unset reads forever), not {value}")
        self.start_read_time_ms()  # validates the start position early, with a clear message
        unknown = sorted({topic for topic, _ in self.start_offsets} - set(self.topics))
        if unknown:
            raise ValueError(f"--kafka_start_offsets names topics the job does not read: {', '.join(unknown)}")

    def start_read_time_ms(self) -> int | None:
        if self.start_offset in _START_KEYWORDS:
            return None
        try:
            start = datetime.fromisoformat(self.start_offset)
        except ValueError as exc:
            raise ValueError(
                f"--start_offset must be earliest, latest or an ISO-8601 time, not {self.start_offset!r}"
            ) from exc
        if start.tzinfo is None:
            raise ValueError(f"--start_offset {self.start_offset!r} needs a UTC offset, e.g. 'Z'")
        return int(start.timestamp() * 1000)

    def consumer_config(self) -> dict[str, str]:
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.consumer_group,
            "auto.offset.reset": "latest" if self.start_offset == "latest" else "earliest",
            # Commits happen on bundle finalization (commit_offset_in_finalize), after Beam has
            # checkpointed the records, never on the consumer's own timer.
            "enable.auto.commit": "false",
        }
        config.update(self.extra_config)
        return config

    @classmethod
    def from_options(cls, options: PipelineOptions, start_offset: str | None = None) -> KafkaReadSettings:
        """``start_offset`` replaces ``--start_offset``: the streaming job's plan resolves ``resume`` to a time."""
        kafka = options.view_as(KafkaReadOptions)
        topics = tuple(topic for topic in (kafka.cdc_topic, kafka.json_topic) if topic)
        values = option_values(cls, kafka)
        if start_offset is not None:
            values["start_offset"] = start_offset
        return cls(topics=topics, start_offsets=parse_start_offsets(kafka.kafka_start_offsets, topics), **values)


def parse_start_offsets(text: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """``"0:1234,1:99"`` (one topic) or ``"topic:0:1234"`` -> {(topic, partition): first offset processed}."""
    offsets: dict[tuple[str, int], int] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        fields = entry.rsplit(":", 2)  # topic names cannot contain ':'
        if len(fields) == 2:
            if len(topics) != 1:
                raise ValueError(
                    f"--kafka_start_offsets entry {entry!r} names no topic, but the job reads {len(topics)} topics: "
                    "write TOPIC:PARTITION:OFFSET"
                )
            topic, (partition_text, offset_text) = topics[0], fields
        elif len(fields) == 3:
            topic, partition_text, offset_text = fields
        else:
            raise ValueError(f"--kafka_start_offsets expects [TOPIC:]PARTITION:OFFSET, got {entry!r}")
        if not (partition_text.isdigit() and offset_text.isdigit()):
            raise ValueError(f"--kafka_start_offsets: partition and offset must be whole numbers, got {entry!r}")
        key = (topic, int(partition_text))
        if key in offsets:
            raise ValueError(f"--kafka_start_offsets gives partition {key[1]} of {topic} twice")
        offsets[key] = int(offset_text)
    return offsets


def before_start_offset(source: SourceCoordinates, start_offsets: PartitionOffsets) -> bool:
    """Whether a record lies below the operator's start offset for its partition."""
    start = start_offsets.get((source.topic, source.partition))
    return start is not None and source.offset is not None and source.offset < start


class SkipBeforeStartOffsetsFn(beam.DoFn):
    """Drops records below ``--kafka_start_offsets``; logs each bundle's skipped offset ranges per partition."""

    def __init__(self, start_offsets: PartitionOffsets) -> None:
        self._start_offsets = dict(start_offsets)
        self._skipped = Metrics.counter("kafka", "skipped_before_start_offset")

    def start_bundle(self) -> None:
        self._ranges: dict[tuple[str, int], tuple[int, int, int]] = {}

    def process(self, record: RawRecord) -> Iterator[RawRecord]:
        source = record.source
        if not before_start_offset(source, self._start_offsets):
            yield record
            return
        self._skipped.inc()
        key = (source.topic, source.partition)
        low, high, count = self._ranges.get(key, (source.offset, source.offset, 0))
        self._ranges[key] = (min(low, source.offset), max(high, source.offset), count + 1)

    def finish_bundle(self) -> None:
        for (topic, partition), (low, high, count) in sorted(self._ranges.items()):
            _log.warning(
                "--kafka_start_offsets: skipped %d record(s) of %s partition %d at offsets %d..%d "
                "(processing starts at offset %d)",
                count,
                topic,
                partition,
                low,
                high,
                self._start_offsets[(topic, partition)],
            )


def to_raw_record(record: Any) -> RawRecord:
    """A KafkaIO record with metadata (a Beam Row) as the pipeline's ``RawRecord``.

    Built unvalidated (``trusted``), at a third of validation's cost on every record: KafkaIO's schema already
    types each field (bytes or null, a string, an int32, an int64)."""
    source = SourceCoordinates.trusted(
        kind="kafka",
        topic=record.topic,
        partition=int(record.partition),
        offset=int(record.offset),
        table=None,
        row_id=None,
    )
    return RawRecord.trusted(value=record.value, key=record.key, source=source)


class ReadRawRecordsFromKafka(beam.PTransform):
    """KafkaIO (cross-language) -> ``RawRecord`` with topic/partition/offset coordinates."""

    def __init__(self, settings: KafkaReadSettings) -> None:
        super().__init__()
        self._settings = settings

    def expand(self, begin: beam.pvalue.PBegin) -> beam.PCollection[RawRecord]:
        settings = self._settings
        records = (
            begin
            | "KafkaIO"
            >> ReadFromKafka(
                consumer_config=settings.consumer_config(),
                topics=list(settings.topics),
                with_metadata=True,
                start_read_time=settings.start_read_time_ms(),
                max_num_records=settings.max_records,
                max_read_time=settings.max_read_seconds,
                commit_offset_in_finalize=settings.commit_offsets,
                # KafkaIO's bounded (legacy) read refuses a polling timeout other than its default.
                **({} if settings.max_read_seconds else {"consumer_polling_timeout": settings.poll_timeout_seconds}),
                expansion_service=java_expansion_service(
                    settings.expansion_service, "kafka", loopback_worker=settings.loopback_worker
                ),
            )
            | "ToRawRecord" >> beam.Map(to_raw_record)
        )
        if not settings.start_offsets:
            return records
        for (topic, partition), offset in sorted(settings.start_offsets.items()):
            _log.warning(
                "--kafka_start_offsets: skipping offsets below %d of %s partition %d", offset, topic, partition
            )
        return records | "SkipBeforeStartOffsets" >> beam.ParDo(SkipBeforeStartOffsetsFn(settings.start_offsets))
