"""KafkaIO and the Storage Write API sink expand offline with the Java expansion services that
scripts/fetch-beam-artifacts put in place for the pinned Beam version: nothing is downloaded at run time.
(Needs Java and the fetched jars, not the stack.)"""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from tests.unit.helpers import PODCAST, plain_event
from transforms.decode import decode_record
from transforms.enrich import enrich
from transforms.kafka_source import KafkaReadSettings, ReadRawRecordsFromKafka
from transforms.sinks.bigquery import BigQuerySinkSettings, WriteEnrichedEvents


def transform_urns(pipeline: beam.Pipeline) -> set[str]:
    return {t.spec.urn for t in pipeline.to_runner_api().components.transforms.values()}


def transform_names(pipeline: beam.Pipeline) -> set[str]:
    return {t.unique_name for t in pipeline.to_runner_api().components.transforms.values()}


def test_storage_write_api_sink_expands_with_the_fetched_gcp_jar():
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming"]))
    events = pipeline | beam.Create([enrich(decode_record(plain_event(1, 5).value).event, PODCAST)])
    events | WriteEnrichedEvents(BigQuerySinkSettings(project="example-project", dataset="engagement", streaming=True))
    assert "beam:transform:org.apache.beam:bigquery_write:v1" in transform_urns(pipeline)


def test_kafka_read_expands_with_the_fetched_io_jar():
    pipeline = beam.Pipeline(options=PipelineOptions(["--streaming"]))
    settings = KafkaReadSettings(
        bootstrap_servers="127.0.0.1:9", topics=("cdc.public.engagement_events",), consumer_group="expansion-test"
    )
    pipeline | ReadRawRecordsFromKafka(settings)
    # Expanded by Java: KafkaIO's own composite, reading through its splittable DoFn.
    assert "ReadRawRecordsFromKafka/KafkaIO/KafkaIO.Read/KafkaIO.Read.ReadFromKafkaViaSDF" in transform_names(pipeline)
