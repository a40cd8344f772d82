"""The streaming job's graph as Dataflow would receive it from the flex template, and the backfill's, built offline.

``--dry_run`` makes DataflowRunner do everything up to the API call: overrides, the Runner v2 proto with each
environment resolved to its Docker image, and the job description. KafkaIO and the Storage Write API sink are
expanded by the real Java expansion services scripts/fetch-beam-artifacts put in place (the jars the template
image bakes in). Every endpoint is an unresolvable name: building the graph must not connect to anything.
Needs Java and the fetched jars, not the local stack. What only a Google Cloud project can check (staging,
the launcher VM, workers) is listed in README.md, "Deploy on Dataflow".
"""

from __future__ import annotations

import base64
import bz2
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.internal import pickler
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.utils.subprocess_server import SubprocessServer
from apitools.base.py import encoding

from pipelines.backfill import build_pipeline as backfill_pipeline
from pipelines.backfill import plan_from_options
from pipelines.streaming import build_pipeline
from templates.launch import STREAMING_OPTIONS, prepare
from transforms.kafka_source import KafkaReadOptions
from transforms.postgres_source import RangeSummary
from transforms.sinks.http_token import TokenSource

SECRET_TOKEN = "token-from-secret-manager-5b1f"
ENVIRONMENT_TOKEN = "token-in-launcher-environment-9c2e"
TOKEN_SECRET = "projects/example/secrets/http-api-token/versions/1"
POSTGRES_PASSWORD = "postgres-password-from-secret-manager-31c8"
POSTGRES_PASSWORD_SECRET = "projects/example/secrets/postgres-password/versions/2"
REDIS_PASSWORD = "redis-auth-string-from-secret-manager-0e77"
REDIS_PASSWORD_SECRET = "projects/example/secrets/redis-auth/versions/4"
# Secret Manager has no local equivalent: a stand-in reader gives the launcher's checks each secret's payload.
SECRETS = {
    TOKEN_SECRET: SECRET_TOKEN,
    POSTGRES_PASSWORD_SECRET: POSTGRES_PASSWORD,
    REDIS_PASSWORD_SECRET: REDIS_PASSWORD,
}
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
    f"--http_api_token_secret={TOKEN_SECRET}",
    f"--postgres_password_secret={POSTGRES_PASSWORD_SECRET}",
    f"--redis_password_secret={REDIS_PASSWORD_SECRET}",
    "--kafka_consumer_config=security.protocol=PLAINTEXT\nclient.id=engagement-dataflow",
]


@pytest.fixture(scope="module")
def dataflow_job():
    """The job Dataflow would receive, its options and the HTTP token; built once (up to a minute)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _build_job(monkeypatch)


def _build_job(monkeypatch: pytest.MonkeyPatch) -> DataflowJob:
    # The launcher's environment holds a token too: it must not leak into the graph by that route either.
    monkeypatch.setenv("HTTP_API_TOKEN", ENVIRONMENT_TOKEN)
    arguments = prepare(TEMPLATE_ARGUMENTS, STREAMING_OPTIONS, secret_reader=SECRETS.__getitem__)
    options = PipelineOptions(arguments)
    with SubprocessServer.cache_subprocesses():
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, options)
        result = pipeline.run()
    return DataflowJob(result.job, options)


@dataclass(frozen=True)
class DataflowJob:
    job: Any
    options: PipelineOptions


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


def _staged_bytes(job) -> list[bytes]:
    """What Dataflow stages and shows: the pipeline proto, the job description, and every pickled payload
    inside them opened up (Beam's picklers compress, so a token in a DoFn is not visible in the raw proto)."""
    staged = [job.proto_pipeline.SerializeToString(), encoding.MessageToJson(job.proto).encode()]
    for transform in _transforms(job):
        if transform.spec.urn != common_urns.primitives.PAR_DO.urn:
            continue
        do_fn = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload).do_fn
        # Java DoFns are Java-serialized, uncompressed, and already in the proto's bytes.
        if do_fn.urn == python_urns.PICKLED_DOFN_INFO:
            compressed = base64.b64decode(do_fn.payload)
            staged.append(bz2.decompress(compressed) if compressed.startswith(b"BZh") else zlib.decompress(compressed))
    return staged


def test_the_http_api_sink_reads_its_token_from_the_secret_and_the_token_is_nowhere_in_the_staged_job(dataflow_job):
    job = dataflow_job.job
    names = {transform.unique_name for transform in _transforms(job)}
    assert "External HTTP API" in names
    (post,) = [
        t
        for t in _transforms(job)
        if t.unique_name.startswith("External HTTP API/PostBatches") and t.spec.urn == common_urns.primitives.PAR_DO.urn
    ]
    do_fn = pickler.loads(beam_runner_api_pb2.ParDoPayload.FromString(post.spec.payload).do_fn.payload)
    assert do_fn[0]._settings.token_source == TokenSource(secret_version=TOKEN_SECRET)
    staged = _staged_bytes(job)
    assert len(staged) > 20  # the payloads were opened, so the search below looks inside them
    for token in (SECRET_TOKEN, ENVIRONMENT_TOKEN):
        assert not any(token.encode() in blob for blob in staged), token


def test_workers_read_the_postgresql_and_redis_passwords_from_their_secrets_which_are_nowhere_in_the_staged_job(
    dataflow_job,
):
    staged = _staged_bytes(dataflow_job.job)
    # The content loader and lookup and the Redis sink carry the secrets' names, not their payloads.
    for name, password in ((POSTGRES_PASSWORD_SECRET, POSTGRES_PASSWORD), (REDIS_PASSWORD_SECRET, REDIS_PASSWORD)):
        assert any(name.encode() in blob for blob in staged), name
        assert not any(password.encode() in blob for blob in staged), name


def test_a_multi_line_template_parameter_becomes_repeated_kafka_properties(dataflow_job):
    properties = dataflow_job.options.view_as(KafkaReadOptions).kafka_consumer_config
    assert properties == ["security.protocol=PLAINTEXT", "client.id=engagement-dataflow"]


# --- the backfill on Dataflow: one batch job whose parallelism comes from its splits and its keys -----------

BACKFILL_ARGUMENTS = [
    "--runner=DataflowRunner",
    "--project=example",
    "--region=us-central1",
    "--temp_location=gs://example/tmp",
    "--dry_run=True",
    f"--sdk_container_image={IMAGE}",
    "--bigquery_write_method=storage_write_api",
    "--start=2026-11-22T00:00:00Z",
    "--end=2026-11-23T00:00:00Z",
    "--read_splits=32",
    "--postgres_dsn=host=postgres.invalid dbname=engagement user=engagement",
    "--redis_url=redis://redis.invalid:6379/0",
]


@pytest.fixture(scope="module")
def backfill_job() -> DataflowJob:
    """The backfill job Dataflow would receive for a day of 86 million events, built without any service."""
    options = PipelineOptions(BACKFILL_ARGUMENTS)
    plan = plan_from_options(options)
    plan = dataclasses.replace(plan, summary=RangeSummary(rows=86_400_000, min_id=1, max_id=86_400_000))
    with SubprocessServer.cache_subprocesses():
        pipeline = beam.Pipeline(options=options)
        backfill_pipeline(pipeline, options, plan)
        result = pipeline.run()
    return DataflowJob(result.job, options)


def _producers(job) -> dict[str, beam_runner_api_pb2.PTransform]:
    """Each PCollection id's producing leaf transform."""
    return {
        output: transform
        for transform in _transforms(job)
        if not transform.subtransforms
        for output in transform.outputs.values()
    }


def test_the_backfill_is_one_batch_job_on_dataflow(backfill_job):
    options = backfill_job.options
    assert not options.view_as(StandardOptions).streaming
    assert backfill_job.job.proto.type.name == "JOB_TYPE_BATCH"
    plan = plan_from_options(options)
    assert (plan.chunk_rows, plan.parallel_chunks) == (0, 1)  # workers, not chunks, carry a long range


def test_the_backfill_reads_postgresql_in_its_splits_behind_a_reshuffle(backfill_job):
    # Without the reshuffle, Dataflow fuses the splits' Create with the reads and one worker reads them all.
    job = backfill_job.job
    (read,) = [t for t in _transforms(job) if t.unique_name == "Read engagement_events/ReadRange"]
    (source,) = read.inputs.values()
    assert _producers(job)[source].unique_name.startswith("Read engagement_events/SpreadSplits/")


def test_the_backfill_joins_known_ids_by_key_not_through_one_workers_memory(backfill_job):
    job = backfill_job.job
    names = [t.unique_name for t in _transforms(job)]
    assert any(name.startswith("Skip events in BigQuery/JoinById") for name in names)
    side_inputs = [
        t.unique_name
        for t in _transforms(job)
        if t.unique_name.startswith("Skip events in BigQuery/")
        and t.spec.urn == common_urns.primitives.PAR_DO.urn
        and beam_runner_api_pb2.ParDoPayload.FromString(t.spec.payload).side_inputs
    ]
    assert side_inputs == []


def test_the_backfill_has_no_step_that_gathers_every_event_under_one_key(backfill_job):
    # Every shuffle of events or aggregates is keyed by id, window and content, or shard: a GroupByKey whose
    # input is keyed by a constant would put the whole range on one worker. The only single-element inputs
    # are the queries of what BigQuery holds (one DoFn each) and the content snapshot.
    job = backfill_job.job
    global_combines = [
        t.unique_name for t in _transforms(job) if "CombineGlobally" in t.unique_name or "/KeyWithVoid" in t.unique_name
    ]
    assert global_combines == []
