"""Where the PostgreSQL password is read, and that it never travels in the job graph."""

import pickle

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import postgres_from_options
from transforms import secrets
from transforms.postgres import PostgresDsn
from transforms.secrets import SecretSource

DSN = "host=db.internal dbname=engagement user=engagement sslmode=verify-full"
SECRET = "projects/example/secrets/postgres-password/versions/3"
PASSWORD = "pg-password-7d41"


def test_a_secret_version_travels_as_its_name_and_each_worker_reads_it_when_it_connects(monkeypatch):
    options = PipelineOptions(
        ["--runner=DataflowRunner", f"--postgres_dsn={DSN}", f"--postgres_password_secret={SECRET}"]
    )
    postgres = postgres_from_options(options)
    assert postgres == PostgresDsn(DSN, SecretSource(secret_version=SECRET))
    assert PASSWORD.encode() not in pickle.dumps(postgres)

    # Secret Manager has no local equivalent: a stand-in returns the payload.
    read: list[str] = []
    monkeypatch.setattr(secrets, "read_secret_version", lambda name: read.append(name) or PASSWORD)
    connected: list[tuple[str, dict]] = []
    monkeypatch.setattr("psycopg2.connect", lambda dsn, **kwargs: connected.append((dsn, kwargs)))
    worker_copy = pickle.loads(pickle.dumps(postgres))  # noqa: S301 - our own bytes, as the runner ships them
    worker_copy.connect(connect_timeout=5)
    worker_copy.connect()
    assert connected == [(DSN, {"connect_timeout": 5, "password": PASSWORD}), (DSN, {"password": PASSWORD})]
    assert read == [SECRET]  # once per process, not per connection


def test_a_password_in_the_dsn_is_refused_on_dataflow_and_kept_locally():
    with_password = "host=db dbname=engagement user=engagement password=hunter2"
    with pytest.raises(ValueError, match="would travel in the job graph"):
        postgres_from_options(PipelineOptions(["--runner=DataflowRunner", f"--postgres_dsn={with_password}"]))
    # The local stack's default DSN carries its own development password.
    assert postgres_from_options(PipelineOptions([f"--postgres_dsn={with_password}"])) == PostgresDsn(with_password)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([f"--postgres_password_secret={SECRET}", "--postgres_password_file=/run/pg"], "not both"),
        (["--postgres_dsn=host=db password=x", f"--postgres_password_secret={SECRET}"], "keep one"),
        ([f"--postgres_dsn={DSN}", "--postgres_password_secret=postgres-password"], "is not projects/PROJECT/secrets"),
        (["--runner=DataflowRunner", f"--postgres_dsn={DSN}", "--postgres_password_file=/run/pg"], "launcher's files"),
        ([f"--postgres_dsn={DSN}", "--postgres_password_file=/nonexistent/pg"], "cannot read the PostgreSQL password"),
    ],
)
def test_contradictory_or_unreadable_password_sources_fail_where_the_pipeline_is_built(arguments, message):
    with pytest.raises(ValueError, match=message):
        postgres_from_options(PipelineOptions(arguments))


def test_a_password_file_is_read_at_launch_and_again_by_the_worker_never_stored(tmp_path, monkeypatch):
    password_file = tmp_path / "pg-password"
    password_file.write_text(PASSWORD + "\n")
    postgres = postgres_from_options(
        PipelineOptions([f"--postgres_dsn={DSN}", f"--postgres_password_file={password_file}"])
    )
    assert PASSWORD.encode() not in pickle.dumps(postgres)
    assert PASSWORD not in repr(postgres)
    assert postgres.password is not None
    assert postgres.password.read().reveal() == PASSWORD
