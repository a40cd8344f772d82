"""The one retry policy of the pipeline's I/O: every sink and lookup that retries builds its retrying here.

Built on tenacity, so attempts, deadlines and waits mean the same everywhere and tests inject the sleep:

- **Full jitter.** The wait before retry *n* is uniform in ``[0, min(max, initial * 2^(n-1))]``: workers or
  shards that failed together do not retry together.
- **A deadline never slept towards.** With ``within_seconds``, a wait that would end past the deadline is not
  started: the caller gives up at once instead of sleeping towards a certain give-up.
- **Give-up is the caller's.** The last exception is raised again (``reraise``), so each caller turns it into
  its own outcome: a dead letter, a failed bundle the runner retries, or a counted best effort.

The HTTP sink adds the one thing specific to it, the server's ``Retry-After`` as a floor on the wait
(``transforms/sinks/http_api.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tenacity
from tenacity import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff ceilings: ``initial_seconds`` before the first retry, doubling up to ``max_seconds``."""

    initial_seconds: float
    max_seconds: float

    def __post_init__(self) -> None:
        if self.initial_seconds <= 0:
            raise ValueError("the initial backoff must be positive")
        if self.max_seconds < self.initial_seconds:
            raise ValueError("the maximum backoff must be at least the initial one")

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1-based)."""
        return min(self.max_seconds, self.initial_seconds * 2 ** min(retry - 1, 62))

    def full_jitter(self) -> wait_base:
        """A wait uniform in ``[0, ceiling(retry)]``."""
        return tenacity.wait_random_exponential(multiplier=self.initial_seconds, max=self.max_seconds)


def retrying(
    retry: retry_base,
    backoff: Backoff,
    *,
    attempts: int | None = None,
    within_seconds: float | None = None,
    wait: wait_base | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
) -> tenacity.Retrying:
    """Retries what ``retry`` accepts, up to ``attempts`` tries and within ``within_seconds`` of the first,
    waiting ``wait`` (default: ``backoff``'s full jitter); then raises the last exception again (or
    ``tenacity.RetryError`` when the last try returned a result ``retry`` still rejects).

    ``within_seconds=0`` makes one attempt; neither bound means retrying for ever."""
    stops: list[stop_base] = []
    if attempts is not None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        stops.append(tenacity.stop_after_attempt(attempts))
    if within_seconds is not None:
        if within_seconds < 0:
            raise ValueError("within_seconds must not be negative")
        stops.append(tenacity.stop_before_delay(within_seconds))
    return tenacity.Retrying(
        retry=retry,
        stop=tenacity.stop_any(*stops) if stops else tenacity.stop_never,
        wait=wait if wait is not None else backoff.full_jitter(),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
