"""The HTTP sink's delivery rules: which answers are retried, how long to wait, when to give up.

A pure loop over one batch's POSTs (``deliver``), with the send, the sleep, the clock and the jitter injected,
so its rules are tested without a server (docs/http-sink.md, "Retries").
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import requests
import tenacity

from transforms.retry import Backoff
from transforms.settings import setting

RETRY_AFTER_STATUSES = frozenset({429, 503})


# --- retry rules ----------------------------------------------------------------------------------------


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify_status(status: int) -> Verdict:
    """SPEC §6: 408, 429 and 5xx are worth retrying; any other non-2xx will fail the same way again."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status in (408, 429) or 500 <= status < 600:
        return Verdict.RETRY
    # 3xx included: redirects are not followed (a POST body and its token must not wander to another URL).
    return Verdict.REJECTED


def classify_exception(error: BaseException) -> Verdict:
    """Transport failures are retried; a request that cannot be built (bad URL, bad header) never succeeds."""
    if isinstance(error, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return Verdict.RETRY
    return Verdict.REJECTED


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None if absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; parsedate_to_datetime leaves "-0000" naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = setting(
        30,
        flag="--http_api_max_attempts",
        type=int,
        help="Most POST attempts per batch (the first one included) before its events are dead-lettered.",
    )
    max_retry_seconds: float = setting(
        300.0,
        flag="--http_api_max_retry_seconds",
        type=float,
        help=(
            "Longest time one batch is retried before its events are dead-lettered, in seconds. Longer "
            "rides out longer outages; shorter frees the sink sooner and dead-letters sooner."
        ),
    )
    initial_backoff_seconds: float = setting(
        0.5,
        flag="--http_api_initial_backoff_seconds",
        type=float,
        help="Ceiling of the first retry's random wait, doubled for each further retry, in seconds.",
    )
    max_backoff_seconds: float = setting(
        30.0,
        flag="--http_api_max_backoff_seconds",
        type=float,
        help="Largest ceiling of the random wait between retries, in seconds.",
    )
    retry_after_cap_seconds: float = setting(
        120.0,
        flag="--http_api_retry_after_cap_seconds",
        type=float,
        help="Longest Retry-After (from a 429 or 503) that is honoured as is; longer values are capped.",
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_retry_seconds < 0 or self.initial_backoff_seconds <= 0 or self.retry_after_cap_seconds < 0:
            raise ValueError("retry durations must be positive")
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ValueError("max_backoff_seconds must be at least initial_backoff_seconds")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.initial_backoff_seconds, self.max_backoff_seconds)

    def exhausted(self, attempts: int, elapsed: float, upcoming_wait: float) -> bool:
        """Out of attempts, or the next wait would end past the retry budget (never slept towards)."""
        return attempts >= self.max_attempts or elapsed + upcoming_wait > self.max_retry_seconds

    def give_up_reason(self, attempts: int, elapsed: float, upcoming_wait: float, last: Attempt) -> str:
        if attempts >= self.max_attempts:
            return f"gave up after {attempts} attempts in {elapsed:.1f}s; last: {last.describe()}"
        return (
            f"gave up after {attempts} attempts in {elapsed:.1f}s (next wait {upcoming_wait:.1f}s would pass "
            f"the {self.max_retry_seconds:g}s retry budget); last: {last.describe()}"
        )

    def delay(self, retry: int, retry_after: float | None, uniform: Callable[[], float]) -> float:
        """Full jitter (uniform in [0, ceiling]) spreads shards that failed together; a server's Retry-After
        (capped, so a bogus value cannot park a batch for hours) is a floor, never shortened."""
        jittered = uniform() * self.backoff.ceiling(retry)
        if retry_after is None:
            return jittered
        return max(min(retry_after, self.retry_after_cap_seconds), jittered)


@dataclass(frozen=True)
class Attempt:
    """The result of one POST, reduced to what the retry loop and the dead letters need."""

    verdict: Verdict
    status: int | None = None
    retry_after: float | None = None
    replayed: bool = False
    detail: str = ""

    def describe(self) -> str:
        return f"HTTP {self.status}: {self.detail}" if self.status is not None else self.detail


@dataclass(frozen=True)
class Delivery:
    delivered: bool
    attempts: int
    replayed: bool = False
    reason: str = ""
    deferred: Attempt | None = None
    """Not delivered yet, worth retrying later: the last answer (streaming tries a batch once in its bundle)."""

    @property
    def retries(self) -> int:
        return self.attempts - 1


class DeliveryInterruptedError(Exception):
    """The DoFn is being torn down while a batch waits to be retried; the runner will retry the bundle."""


def deliver(
    send: Callable[[], Attempt],
    policy: RetryPolicy,
    sleep: Callable[[float], bool],
    clock: Callable[[], float] = time.monotonic,
    uniform: Callable[[], float] = random.random,
) -> Delivery:
    """Sends one batch until it is delivered, rejected, or out of attempts or time.

    The retrying is ``transforms.retry``'s policy (full jitter, a budget never slept towards) with the wait
    floored by the server's Retry-After. ``sleep`` returns False when waiting was interrupted. A wait that
    would end after the retry budget is not started: the batch is dead-lettered at once instead of sleeping
    towards a certain give-up.
    """
    started = clock()

    def wait(state: tenacity.RetryCallState) -> float:
        return policy.delay(state.attempt_number, state.outcome.result().retry_after, uniform)

    def out_of_attempts_or_time(state: tenacity.RetryCallState) -> bool:
        return policy.exhausted(state.attempt_number, clock() - started, state.upcoming_sleep)

    def interruptible(seconds: float) -> None:
        if not sleep(seconds):
            raise DeliveryInterruptedError("shutting down while retrying a batch")

    def give_up(state: tenacity.RetryCallState) -> Delivery:
        attempts, elapsed = state.attempt_number, clock() - started
        reason = policy.give_up_reason(attempts, elapsed, state.upcoming_sleep, state.outcome.result())
        return Delivery(False, attempts, reason=reason)

    sending = tenacity.Retrying(
        retry=tenacity.retry_if_result(lambda attempt: attempt.verdict is Verdict.RETRY),
        stop=out_of_attempts_or_time,
        wait=wait,
        sleep=interruptible,
        retry_error_callback=give_up,
    )
    last = sending(send)
    if isinstance(last, Delivery):  # out of attempts or time (give_up)
        return last
    return delivery_of(last, sending.statistics.get("attempt_number", 1))


def delivery_of(attempt: Attempt, attempts: int) -> Delivery:
    """What a batch's latest attempt makes of it: delivered, rejected for good, or (RETRY) deferred."""
    if attempt.verdict is Verdict.DELIVERED:
        return Delivery(True, attempts, replayed=attempt.replayed)
    if attempt.verdict is Verdict.RETRY:
        return Delivery(False, attempts, deferred=attempt)
    return Delivery(False, attempts, reason=f"rejected: {attempt.describe()}")
