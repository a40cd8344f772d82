"""Secrets the workers read themselves: where each is read, and how it stays out of logs and the job graph.

The graph a runner receives (on Dataflow, ``gs://…/staging/pipeline.pb``) holds every DoFn pickled, so a
password or token captured at construction would be readable by anyone who can read the staging bucket. Only a
secret's *source* travels in the graph (``SecretSource``: an environment variable, a file or a Secret Manager
version); each worker reads the value itself when it opens its client, in ``DoFn.setup()`` or at a connection.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

SECRET_VERSION_PATTERN = r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$"  # noqa: S105 - a resource name, not a secret


class Secret:
    """A string that does not show itself: repr(), str() and f-strings print a placeholder."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


def redact(text: str, secret: Secret) -> str:
    """``text`` without the secret: a defence against servers or libraries that echo what they were sent."""
    value = secret.reveal()
    return text.replace(value, "***") if value else text


def read_secret_version(version_name: str) -> str:
    """The payload of a Secret Manager secret version, read with application default credentials.

    Errors name the version and the reason, never a payload."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import secretmanager

    try:
        client = secretmanager.SecretManagerServiceClient()
        response = client.access_secret_version(name=version_name, timeout=30)
    except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as error:
        raise ValueError(f"cannot read {version_name} from Secret Manager: {error}") from error
    return response.payload.data.decode("utf-8").strip()


def check_secret_version(option: str, version_name: str) -> None:
    if not re.fullmatch(SECRET_VERSION_PATTERN, version_name):
        raise ValueError(f"{option} {version_name!r} is not projects/PROJECT/secrets/NAME/versions/VERSION")


@dataclass(frozen=True)
class SecretSource:
    """Exactly one place a secret is read from: an environment variable, a file, or a Secret Manager version.

    ``what`` names the secret in messages ("the PostgreSQL password"); it is not part of equality."""

    env_var: str | None = None
    file_path: str | None = None
    secret_version: str | None = None
    what: str = field(default="the secret", compare=False)

    def __post_init__(self) -> None:
        if sum(bool(source) for source in (self.env_var, self.file_path, self.secret_version)) != 1:
            raise ValueError(f"{self.what}: give exactly one of an environment variable, a file and a secret")

    @property
    def description(self) -> str:
        if self.secret_version:
            return f"the Secret Manager version {self.secret_version}"
        if self.file_path:
            return f"the file {self.file_path}"
        return f"the environment variable {self.env_var}"

    def read(self) -> Secret:
        """The value, read now. Errors name the source, never the value."""
        if self.secret_version:
            value = read_secret_version(self.secret_version)
        elif self.file_path:
            try:
                value = Path(self.file_path).read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ValueError(f"cannot read {self.what} from {self.description}: {error}") from error
        else:
            value = os.environ.get(self.env_var or "", "").strip()
        if not value:
            raise ValueError(f"{self.what} from {self.description} is missing or empty")
        return Secret(value)


def read_cached(source: SecretSource) -> Secret:
    """``source.read()``, except that a Secret Manager version is read once per process: connections opened
    again later (a content reload every few minutes) do not each call Secret Manager, and a rotated secret
    reaches a worker when it restarts. A file or a variable is read each time, so a rotated file is seen at once.
    """
    return _read_version_once(source) if source.secret_version else source.read()


@functools.cache
def _read_version_once(source: SecretSource) -> Secret:
    return source.read()


def runs_on_dataflow(options: PipelineOptions) -> bool:
    """Whether the workers are Dataflow's, which have neither the launcher's environment nor its files."""
    return "Dataflow" in str(options.view_as(StandardOptions).runner)


def password_source_from(
    options: PipelineOptions,
    *,
    what: str,
    target_option: str,
    target_has_password: bool,
    secret_option: str,
    secret: str | None,
    file_option: str,
    file_path: str | None,
) -> SecretSource | None:
    """Where a service's password is read, from its options; checked where the pipeline is built.

    The target (a DSN, a URL) travels in the job graph, so on Dataflow a password inside it is refused in favour
    of the secret; Dataflow workers have none of the launcher's files either. A file is read once here, so a
    missing one fails the launch rather than every worker. None: the target's own password, or none at all."""
    on_dataflow = runs_on_dataflow(options)
    if secret and file_path:
        raise ValueError(f"give {secret_option} or {file_option}, not both")
    if target_has_password and (secret or file_path):
        raise ValueError(f"{target_option} holds a password and a password source is given too: keep one")
    if on_dataflow and target_has_password:
        raise ValueError(
            f"{target_option} holds a password, which would travel in the job graph: give it as {secret_option} "
            "(a Secret Manager version) instead"
        )
    if on_dataflow and file_path:
        raise ValueError(f"Dataflow workers do not have the launcher's files: give {secret_option}")
    if secret:
        check_secret_version(secret_option, secret)
        return SecretSource(secret_version=secret, what=what)
    if file_path:
        source = SecretSource(file_path=file_path, what=what)
        source.read()
        return source
    return None
