"""One POST of one batch, as both HTTP sink steps make it: the first try (``PostBatchesFn``) and the later
retries of a batch the API refused for now (``RetryDeferredBatchesFn``).

A DoFn opens an ``ApiClient`` in ``setup()`` (the token is read there, on the worker, never pickled into the
graph) and closes it in ``teardown()``. ``SinkCounters`` holds the sink's metrics, the same names for both
steps, so a batch counts once as sent whichever step sent it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import requests
from apache_beam.metrics import Metrics
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase

from transforms.model import DeadLetter, SourceCoordinates, Stage
from transforms.sinks.http_delivery import (
    RETRY_AFTER_STATUSES,
    Attempt,
    Verdict,
    classify_exception,
    classify_status,
    parse_retry_after,
)
from transforms.sinks.http_token import Secret, redact
from transforms.sinks.http_wire import Batch, display_url

if TYPE_CHECKING:
    from transforms.sinks.http_api import HttpSinkSettings

METRICS_NAMESPACE = "sink.http"
REASON_EXCERPT_CHARS = 200


def _excerpt(raw: bytes, token: Secret) -> str:
    text = " ".join(raw[: REASON_EXCERPT_CHARS * 4].decode("utf-8", errors="replace").split())
    return redact(text, token)[:REASON_EXCERPT_CHARS]


class BearerAuth(AuthBase):
    """The bearer token as the session's auth rather than a default header. Without an auth of its own, requests
    looks up ``~/.netrc`` on every request (a file lookup per POST), and an entry there for the API's host would
    replace the token with Basic credentials."""

    def __init__(self, token: Secret) -> None:
        self._header = f"Bearer {token.reveal()}"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = self._header
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


class ApiClient:
    """A pooled session to the API with the bearer token; ``send`` makes exactly one attempt."""

    def __init__(self, settings: HttpSinkSettings) -> None:
        self._endpoint = settings.endpoint
        self._timeouts = (settings.connect_timeout_seconds, settings.read_timeout_seconds)
        self._token = settings.token_source.read()
        self._session = requests.Session()
        # No urllib3 retries: every retry goes through the sink's own rules (Retry-After, budgets).
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=settings.max_in_flight, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.auth = BearerAuth(self._token)
        self._session.headers["Content-Type"] = "application/json"
        self.endpoint_shown = display_url(settings.endpoint)
        """The endpoint as logs and dead letters may show it: no user info, no query string."""

    def send(self, batch: Batch) -> Attempt:
        try:
            response = self._session.post(
                self._endpoint,
                data=batch.body(),
                headers={"Idempotency-Key": batch.key},
                timeout=self._timeouts,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            # Exception texts carry the URL but never headers; redacted anyway, in case a server echoes them.
            detail = redact(f"{type(error).__name__}: {error}", self._token)[:REASON_EXCERPT_CHARS]
            return Attempt(classify_exception(error), detail=detail)
        with response:
            status = response.status_code
            verdict = classify_status(status)
            if verdict is Verdict.DELIVERED:
                replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
                return Attempt(verdict, status=status, replayed=replayed)
            retry_after = None
            if status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))
            return Attempt(
                verdict, status=status, retry_after=retry_after, detail=_excerpt(response.content, self._token)
            )

    def close(self) -> None:
        self._session.close()


class SinkCounters:
    """The sink's metrics. Update them on the bundle's thread only: Beam's metrics container is thread-local,
    so increments from a pool thread would be lost."""

    def __init__(self) -> None:
        self._batches_sent = Metrics.counter(METRICS_NAMESPACE, "batches_sent")
        self._events_sent = Metrics.counter(METRICS_NAMESPACE, "events_sent")
        self._written = Metrics.counter(METRICS_NAMESPACE, "written")  # events_sent under the name all sinks share
        self.retried = Metrics.counter(METRICS_NAMESPACE, "retried")
        self.deferred = Metrics.counter(METRICS_NAMESPACE, "deferred")
        self._replayed = Metrics.counter(METRICS_NAMESPACE, "replayed")
        self._dead_lettered = Metrics.counter(METRICS_NAMESPACE, "dead_lettered")
        self._batch_seconds = Metrics.distribution(METRICS_NAMESPACE, "batch_delivery_ms")

    def delivered(self, batch: Batch, replayed: bool, seconds: float) -> None:
        self._batches_sent.inc()
        self._events_sent.inc(len(batch.events))
        self._written.inc(len(batch.events))
        if replayed:
            self._replayed.inc()
        self._batch_seconds.update(int(seconds * 1000))

    def dead_letters(self, batch: Batch, reason: str) -> Iterator[DeadLetter]:
        """One dead letter per event of ``batch``, counted."""
        self._dead_lettered.inc(len(batch.events))
        for event_id, payload in batch.events:
            # The enriched event no longer carries its Kafka coordinates; its row in the source of truth is
            # what identifies it, so an operator can re-send it from there.
            source = SourceCoordinates(kind="postgres", table="engagement_events", row_id=event_id)
            yield DeadLetter.of(Stage.HTTP, reason, payload, source, event_id=event_id)


def wall_clock() -> float:
    """Seconds since the epoch: a deferred batch's retry budget spans bundles, and may span workers."""
    return time.time()
