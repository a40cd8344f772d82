"""The streaming job's graph as Dataflow would receive it from the flex template, built offline.

``--dry_run`` makes DataflowRunner do everything up to the API call: overrides, the Runner v2 proto with each
environment resolved to its Docker image, and the job description. KafkaIO and the Storage Write API sink are
expanded by the real Java expansion services scripts/fetch-beam-artifacts put in place (the jars the template
image bakes in). Every endpoint is an unresolvable name: building the graph must not connect to anything.
Needs Java and the fetched jars, not the local stack. What only a Google Cloud project can check (staging,
the launcher VM, workers) is listed in README.md, "Deploy on Dataflow".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.utils.subprocess_server import SubprocessServer

from pipelines.streaming import build_pipeline
from templates.launch import STREAMING_OPTIONS, prepare
from transforms.kafka_source import KafkaReadOptions
from transforms.sinks.http_api import HttpSinkSettings

IMAGE = "us-central1-docker.pkg.dev/example/engagement/engagement-streaming:test"
BIGQUERY_WRITE_URN = "beam:transform:org.apache.beam:bigquery_write:v1"

# What templates/run.sh and the flex template launcher hand the template's entry point.
TEMPLATE_ARGUMENTS = [
    "--runner=DataflowRunner",
    "--project=example",
    "--region=us-central1",
    "--temp_location=gs://example/tmp",
    "--streaming",
    "--dry_run=True",
    f"--sdk_container_image={IMAGE}",
    "--bigquery_write_method=storage_write_api",
    "--bootstrap_servers=kafka.invalid:9092",
    "--postgres_dsn=host=postgres.invalid dbname=engagement user=engagement",
    "--redis_url=redis://redis.invalid:6379/0",
    "--http_api_url=https://api.invalid/v1/events",
    "--http_api_token_secret=projects/example/secrets/http-api-token/versions/1",
    "--kafka_consumer_config=security.protocol=PLAINTEXT\nclient.id=engagement-dataflow",
]


@pytest.fixture(scope="module")
def dataflow_job():
    """The job Dataflow would receive, its options and the HTTP token; built once (up to a minute)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _build_job(monkeypatch)


def _build_job(monkeypatch: pytest.MonkeyPatch) -> DataflowJob:
    # Recorded so that undo() restores it after prepare() overwrites it.
    monkeypatch.setenv("HTTP_API_TOKEN", "not-the-token")
    # Secret Manager has no local equivalent: a stand-in reader returns the token the launcher would fetch.
    arguments = prepare(TEMPLATE_ARGUMENTS, STREAMING_OPTIONS, secret_reader=lambda name: f"token-of-{name}")
    options = PipelineOptions(arguments)
    with SubprocessServer.cache_subprocesses():
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, options)
        result = pipeline.run()
    return DataflowJob(result.job, options, token=HttpSinkSettings.from_options(options).token.reveal())


@dataclass(frozen=True)
class DataflowJob:
    job: Any
    options: PipelineOptions
    token: str


def _transforms(job) -> list[beam_runner_api_pb2.PTransform]:
    return list(job.proto_pipeline.components.transforms.values())


def test_the_job_is_a_streaming_job_for_dataflow(dataflow_job):
    job, options = dataflow_job.job, dataflow_job.options
    assert options.view_as(StandardOptions).streaming
    assert job.proto.type.name == "JOB_TYPE_STREAMING"


def test_kafkaio_is_expanded_by_java_and_read_through_its_splittable_dofn(dataflow_job):
    job = dataflow_job.job
    names = {transform.unique_name for transform in _transforms(job)}
    assert "Read Kafka/KafkaIO/KafkaIO.Read/KafkaIO.Read.ReadFromKafkaViaSDF" in names


def test_every_bigquery_table_is_written_by_the_storage_write_api_sink_exactly_once(dataflow_job):
    job = dataflow_job.job
    writes = [t.unique_name for t in _transforms(job) if t.spec.urn == BIGQUERY_WRITE_URN]
    tables = sorted(name.split("/")[0] for name in writes)
    assert tables == ["BigQuery dead_letters", "BigQuery enriched_events", "BigQuery window_aggregates"]
    names = [t.unique_name for t in _transforms(job)]
    for table in tables:
        loads = [name for name in names if name.startswith(f"{table}/") and name.endswith("/StorageApiLoads")]
        assert len(loads) == 1, table
        # Exactly once: rows go to committed streams that are flushed and finalized, not to the default stream.
        assert any(name.startswith(loads[0]) and "Flush and finalize writes" in name for name in names), table


def test_python_workers_run_the_template_image_and_java_workers_beams_java17_image(dataflow_job):
    job = dataflow_job.job
    images = {
        beam_runner_api_pb2.DockerPayload.FromString(environment.payload).container_image
        for environment in job.proto_pipeline.components.environments.values()
    }
    assert images == {IMAGE, f"apache/beam_java17_sdk:{beam.__version__}"}


def test_the_http_api_sink_is_in_the_graph_with_the_token_from_the_secret(dataflow_job):
    names = {transform.unique_name for transform in _transforms(dataflow_job.job)}
    assert "External HTTP API" in names
    assert dataflow_job.token == "token-of-projects/example/secrets/http-api-token/versions/1"


def test_a_multi_line_template_parameter_becomes_repeated_kafka_properties(dataflow_job):
    properties = dataflow_job.options.view_as(KafkaReadOptions).kafka_consumer_config
    assert properties == ["security.protocol=PLAINTEXT", "client.id=engagement-dataflow"]
