"""Where the PostgreSQL and Redis passwords are read, and that they never travel in the job graph."""

import pickle

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import postgres_from_options
from transforms import secrets
from transforms.postgres import PostgresDsn
from transforms.secrets import SecretSource
from transforms.sinks.redis_client import RedisUrl
from transforms.sinks.redis_top import redis_url_from_options

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


def test_the_redis_password_travels_as_its_secrets_name_and_a_password_in_the_url_stays_local():
    redis_secret = "projects/example/secrets/redis-auth/versions/1"
    url = "rediss://10.0.0.9:6378/0"
    options = PipelineOptions(
        ["--runner=DataflowRunner", f"--redis_url={url}", f"--redis_password_secret={redis_secret}"]
    )
    assert redis_url_from_options(options) == RedisUrl(url, SecretSource(secret_version=redis_secret))
    with pytest.raises(ValueError, match="would travel in the job graph"):
        redis_url_from_options(
            PipelineOptions(["--runner=DataflowRunner", "--redis_url=redis://:auth@10.0.0.9:6379/0"])
        )
    local = redis_url_from_options(PipelineOptions(["--redis_url=redis://:auth@127.0.0.1:6379/0"]))
    assert local == RedisUrl("redis://:auth@127.0.0.1:6379/0")
    assert "auth" not in repr(local)
    with pytest.raises(ValueError, match="not both"):
        redis_url_from_options(
            PipelineOptions([f"--redis_password_secret={redis_secret}", "--redis_password_file=/run/redis"])
        )


def test_a_dsn_shows_without_its_own_password():
    shown = repr(PostgresDsn("host=127.0.0.1 dbname=engagement user=engagement password=hunter2"))
    assert "hunter2" not in shown
    assert "host=127.0.0.1" in shown
    assert "password=***" in shown
    assert "hunter2" not in repr(PostgresDsn("not a dsn password=hunter2"))
