"""KafkaReadSettings: what the streaming job's Kafka options accept, and what they refuse with a clear error."""

import logging
import pickle

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.kafka_source import (
    KafkaReadSettings,
    SkipBeforeStartOffsetsFn,
    before_start_offset,
    parse_start_offsets,
    to_raw_record,
)
from transforms.model import RawRecord, SourceCoordinates


def test_the_poll_timeout_defaults_to_one_second_and_follows_the_option():
    assert KafkaReadSettings.from_options(PipelineOptions([])).poll_timeout_seconds == 1
    options = PipelineOptions(["--kafka_poll_timeout_seconds=3"])
    assert KafkaReadSettings.from_options(options).poll_timeout_seconds == 3


def test_a_poll_timeout_that_would_never_poll_is_refused():
    with pytest.raises(ValueError, match="--kafka_poll_timeout_seconds must be at least 1"):
        KafkaReadSettings.from_options(PipelineOptions(["--kafka_poll_timeout_seconds=0"]))


@pytest.mark.parametrize("option", ["kafka_max_records", "kafka_max_read_seconds"])
def test_a_bound_of_zero_which_would_end_the_read_at_once_is_refused(option):
    with pytest.raises(ValueError, match=f"--{option} must be at least 1"):
        KafkaReadSettings.from_options(PipelineOptions([f"--{option}=0"]))
    assert KafkaReadSettings.from_options(PipelineOptions([f"--{option}=5"])) is not None


def test_a_start_time_without_a_utc_offset_is_refused():
    with pytest.raises(ValueError, match="needs a UTC offset"):
        KafkaReadSettings.from_options(PipelineOptions(["--start_offset=2026-11-22T10:00:00"]))


# --- --kafka_start_offsets ---------------------------------------------------------------------------------------

CDC = "cdc.public.engagement_events"
JSON_TOPIC = "app.events"


def test_start_offsets_are_per_partition_and_need_a_topic_only_when_two_are_read():
    assert parse_start_offsets("0:1234, 1:99", [CDC]) == {(CDC, 0): 1234, (CDC, 1): 99}
    assert parse_start_offsets(f"{CDC}:0:5,{JSON_TOPIC}:0:7", [CDC, JSON_TOPIC]) == {(CDC, 0): 5, (JSON_TOPIC, 0): 7}
    assert parse_start_offsets("", [CDC]) == {}
    with pytest.raises(ValueError, match="names no topic, but the job reads 2 topics"):
        parse_start_offsets("0:5", [CDC, JSON_TOPIC])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1234", "expects \\[TOPIC:\\]PARTITION:OFFSET"),
        ("0:-1", "whole numbers"),
        ("a:b", "whole numbers"),
        ("0:1,0:2", "partition 0 of cdc.public.engagement_events twice"),
    ],
)
def test_malformed_start_offsets_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_start_offsets(text, [CDC])


def test_start_offsets_follow_the_option_and_refuse_topics_not_read():
    options = PipelineOptions(["--kafka_start_offsets=2:40"])
    assert KafkaReadSettings.from_options(options).start_offsets == {(CDC, 2): 40}
    with pytest.raises(ValueError, match="topics the job does not read: other"):
        KafkaReadSettings.from_options(PipelineOptions(["--kafka_start_offsets=other:0:1"]))


def test_only_records_below_their_partitions_start_offset_are_before_it():
    offsets = {(CDC, 0): 10}
    at = lambda partition, offset, topic=CDC: SourceCoordinates(  # noqa: E731
        kind="kafka", topic=topic, partition=partition, offset=offset
    )
    assert before_start_offset(at(0, 9), offsets)
    assert not before_start_offset(at(0, 10), offsets)  # the start offset itself is processed
    assert not before_start_offset(at(1, 0), offsets)  # another partition
    assert not before_start_offset(at(0, 0, topic=JSON_TOPIC), offsets)  # another topic


def test_skipped_records_are_dropped_counted_and_logged_with_their_offsets(caplog):
    records = [
        RawRecord(value=b"{}", source=SourceCoordinates(kind="kafka", topic=CDC, partition=p, offset=o))
        for p, o in [(0, 7), (0, 8), (0, 9), (1, 3)]
    ]
    pipeline = test_pipeline.TestPipeline()
    kept = pipeline | beam.Create(records) | beam.ParDo(SkipBeforeStartOffsetsFn({(CDC, 0): 9}))
    assert_that(kept | beam.Map(lambda r: (r.source.partition, r.source.offset)), equal_to([(0, 9), (1, 3)]))
    with caplog.at_level(logging.WARNING, logger="transforms.kafka_source"):
        result = pipeline.run()
        result.wait_until_finish()
    skipped = result.metrics().query(MetricsFilter().with_name("skipped_before_start_offset"))["counters"]
    assert sum(counter.committed for counter in skipped) == 2
    assert f"skipped 2 record(s) of {CDC} partition 0 at offsets 7..8 (processing starts at offset 9)" in caplog.text


@pytest.mark.parametrize(("key", "value"), [(b"k", b'{"id": 1}'), (None, None)])
def test_kafka_records_become_the_raw_records_validation_would_build(key, value):
    row = beam.Row(key=key, value=value, topic="cdc.public.engagement_events", partition=3, offset=2**40)
    validated = RawRecord(
        value=value,
        key=key,
        source=SourceCoordinates(kind="kafka", topic="cdc.public.engagement_events", partition=3, offset=2**40),
    )
    record = to_raw_record(row)
    assert record == validated
    assert record.source.describe() == "kafka:cdc.public.engagement_events/3@1099511627776"
    assert pickle.loads(pickle.dumps(record)) == validated  # noqa: S301 - our own pickle
