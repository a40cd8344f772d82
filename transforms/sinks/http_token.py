"""The HTTP API's bearer token: where it is read, and how it stays out of logs and out of the job graph.

The graph a runner receives (on Dataflow, ``gs://…/staging/pipeline.pb``) holds every DoFn pickled, so a
token captured at construction would be readable by anyone who can read the staging bucket. Only the token's
*source* travels in the graph; each worker reads the token itself in ``DoFn.setup()``. Where the pipeline is
built, the source is checked once (a missing variable or an empty file fails the launch with a clear message),
and the value read there is dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    """``text`` without the secret: a defence against servers or libraries that echo request headers."""
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


@dataclass(frozen=True)
class TokenSource:
    """Exactly one place the token is read from: an environment variable, a file, or a Secret Manager version.

    On Dataflow only the secret reaches the workers (they have neither the launcher's environment nor its
    files), so ``HttpSinkSettings`` refuses the other two there."""

    env_var: str | None = None
    file_path: str | None = None
    secret_version: str | None = None

    def __post_init__(self) -> None:
        if sum(bool(source) for source in (self.env_var, self.file_path, self.secret_version)) != 1:
            raise ValueError(
                "give exactly one of --http_api_token_env, --http_api_token_file and --http_api_token_secret"
            )

    @property
    def description(self) -> str:
        if self.secret_version:
            return f"the Secret Manager version {self.secret_version}"
        if self.file_path:
            return f"the file {self.file_path}"
        return f"the environment variable {self.env_var}"

    def read(self) -> Secret:
        """The token, read now. Errors name the source, never the value."""
        if self.secret_version:
            value = read_secret_version(self.secret_version)
        elif self.file_path:
            try:
                value = Path(self.file_path).read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ValueError(f"cannot read the HTTP API token from {self.description}: {error}") from error
        else:
            value = os.environ.get(self.env_var or "", "").strip()
        if not value:
            raise ValueError(f"the HTTP API token from {self.description} is missing or empty")
        return Secret(value)
