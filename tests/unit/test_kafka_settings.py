"""KafkaReadSettings: what the streaming job's Kafka options accept, and what they refuse with a clear error."""

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from transforms.kafka_source import KafkaReadSettings


def test_the_poll_timeout_defaults_to_one_second_and_follows_the_option():
    assert KafkaReadSettings.from_options(PipelineOptions([])).poll_timeout_seconds == 1
    options = PipelineOptions(["--kafka_poll_timeout_seconds=3"])
    assert KafkaReadSettings.from_options(options).poll_timeout_seconds == 3


def test_a_poll_timeout_that_would_never_poll_is_refused():
    with pytest.raises(ValueError, match="--kafka_poll_timeout_seconds must be at least 1"):
        KafkaReadSettings.from_options(PipelineOptions(["--kafka_poll_timeout_seconds=0"]))


def test_a_start_time_without_a_utc_offset_is_refused():
    with pytest.raises(ValueError, match="needs a UTC offset"):
        KafkaReadSettings.from_options(PipelineOptions(["--start_offset=2026-11-22T10:00:00"]))
