"""The HTTP API's bearer token: where it is read, and how it stays out of logs and out of the job graph.

Only the token's *source* travels in the graph (transforms/secrets.py); each worker reads the token itself in
``DoFn.setup()``. Where the pipeline is built, the source is checked once (a missing variable or an empty file
fails the launch with a clear message), and the value read there is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transforms.secrets import SECRET_VERSION_PATTERN, Secret, SecretSource, read_secret_version, redact

__all__ = ["SECRET_VERSION_PATTERN", "Secret", "TokenSource", "read_secret_version", "redact"]


@dataclass(frozen=True)
class TokenSource(SecretSource):
    """Exactly one place the token is read from: an environment variable, a file, or a Secret Manager version.

    On Dataflow only the secret reaches the workers (they have neither the launcher's environment nor its
    files), so ``HttpSinkSettings`` refuses the other two there."""

    what: str = field(default="the HTTP API token", compare=False)

    def __post_init__(self) -> None:
        if sum(bool(source) for source in (self.env_var, self.file_path, self.secret_version)) != 1:
            raise ValueError(
                "give exactly one of --http_api_token_env, --http_api_token_file and --http_api_token_secret"
            )
