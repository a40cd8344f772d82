"""scripts/dead-letters reads back what the pipeline's dead-letter sink wrote to the emulator."""

import subprocess
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.local_runner import prism_args
from transforms.model import DeadLetter, SourceCoordinates, Stage
from transforms.sinks.bigquery import LOCAL_STORAGE_WRITE, BigQuerySinkSettings, WriteDeadLetters

ROOT = Path(__file__).resolve().parents[2]


def test_dead_letters_written_by_the_pipeline_are_listed_and_summarised(stack, dataset):
    letters = [
        DeadLetter.of(
            Stage.DECODE,
            "not JSON: Expecting value",
            b"\xffgarbage",
            SourceCoordinates(kind="kafka", topic="t", partition=1, offset=7),
        ),
        DeadLetter.of(
            Stage.HTTP,
            "HTTP 400: bad batch",
            b'{"id": 42}',
            SourceCoordinates(kind="postgres", table="engagement_events", row_id=42),
            event_id=42,
        ),
    ]
    settings = BigQuerySinkSettings(
        project=stack.bq_project, dataset=dataset, write_method=LOCAL_STORAGE_WRITE, endpoint=stack.bq_grpc_endpoint
    )
    with beam.Pipeline(options=PipelineOptions(prism_args(streaming=False))) as pipeline:
        pipeline | beam.Create(letters) | WriteDeadLetters(settings)

    command = [str(ROOT / "scripts" / "dead-letters"), "--dataset", dataset]
    listing = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    assert "decode   kafka:t/1@7" in listing
    assert "reason:  not JSON: Expecting value" in listing
    assert "http     postgres:engagement_events/42 event 42" in listing
    only_http = subprocess.run([*command, "--stage", "http"], check=True, capture_output=True, text=True).stdout
    assert "HTTP 400" in only_http
    assert "not JSON" not in only_http
    counts = subprocess.run([*command, "--summary"], check=True, capture_output=True, text=True).stdout
    assert sorted(line.split(None, 1)[0] for line in counts.splitlines()) == ["1", "1"]
