"""The one home of a Redis connection: where the URL and its password come from, and how a client is made.

Used by the Redis sink, the backfill's preflight and ``scripts/top-content``.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from transforms.secrets import SecretSource, read_cached

# Redis errors worth another attempt: the server is unreachable, restarting or loading its dataset
# (BusyLoadingError is a ConnectionError). Anything else (WRONGTYPE, OOM, ...) will fail again.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


@dataclass(frozen=True)
class RedisUrl:
    """A redis:// or rediss:// URL and, apart from it, where the AUTH password is read (transforms/secrets.py).

    The URL travels in the job graph; the password of ``password`` is read by whoever connects."""

    url: str
    password: SecretSource | None = None

    def __repr__(self) -> str:
        # A URL given without a password source may still carry one of its own (local runs).
        return f"RedisUrl(<redacted>, password={self.password!r})"


def connect(
    url: str | RedisUrl, connect_timeout_seconds: float = 2.0, socket_timeout_seconds: float = 5.0
) -> redis.Redis:
    """A pooled client without redis-py's own retries: the sink retries whole batches itself, visibly."""
    target = url if isinstance(url, RedisUrl) else RedisUrl(url)
    password = {} if target.password is None else {"password": read_cached(target.password).reveal()}
    pool = redis.ConnectionPool.from_url(
        target.url,
        **password,
        socket_connect_timeout=connect_timeout_seconds,
        socket_timeout=socket_timeout_seconds,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)
