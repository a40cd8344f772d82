"""The stand-in external HTTP API: idempotency, authentication and the failures tests inject.

Event ids and idempotency keys are unique per test and assertions look only at them, so the suite re-runs
against a long-lived stack and tolerates other traffic. Faults are cleared around every test.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.config import StackConfig
from tests.integration.external_api import ExternalApiClient

TIMEOUT = 10


Api = ExternalApiClient


@pytest.fixture
def api(stack: StackConfig) -> Iterator[Api]:
    client = Api(stack)
    client.set_faults()
    yield client
    client.set_faults()
    client.close()


def new_events(count: int) -> list[dict[str, Any]]:
    return [{"id": f"test-{uuid.uuid4()}", "event_type": "play"} for _ in range(count)]


def new_key() -> str:
    return f"test-batch-{uuid.uuid4()}"


def test_batch_posted_twice_with_the_same_key_is_stored_once(api: Api) -> None:
    events, key = new_events(3), new_key()

    first = api.post_events(events, key)
    retry = api.post_events(events, key)

    assert (first.status_code, first.json()) == (200, {"accepted": 3})
    assert "Idempotent-Replayed" not in first.headers
    assert (retry.status_code, retry.json()) == (200, {"accepted": 3, "replayed": True})
    assert retry.headers["Idempotent-Replayed"] == "true"
    ids = [event["id"] for event in events]
    assert api.receipts(ids) == dict.fromkeys(ids, 1)


def test_same_key_with_a_different_body_is_refused(api: Api) -> None:
    key = new_key()
    assert api.post_events(new_events(1), key).status_code == 200

    other = new_events(1)
    response = api.post_events(other, key)

    assert response.status_code == 422
    assert api.receipts([other[0]["id"]]) == {other[0]["id"]: 0}


def test_the_same_event_in_two_batches_is_counted_twice(api: Api) -> None:
    """The receipt counts catch a sink that re-sends events under a new key."""
    events = new_events(1)
    assert api.post_events(events, new_key()).status_code == 200
    assert api.post_events(events, new_key()).status_code == 200

    event_id = events[0]["id"]
    assert api.receipts([event_id]) == {event_id: 2}


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_bad_token_is_rejected_and_nothing_stored(api: Api, token: str) -> None:
    events = new_events(1)
    headers = {"Idempotency-Key": new_key()}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    response = api.session.post(f"{api.url}/v1/events", json={"events": events}, headers=headers, timeout=TIMEOUT)

    assert response.status_code == 401
    assert api.receipts([events[0]["id"]]) == {events[0]["id"]: 0}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"events": [{"id": "x"}]}', {}),  # no Idempotency-Key
        (b"not json", {"Idempotency-Key": "k"}),
        (b'{"events": []}', {"Idempotency-Key": "k"}),
        (b'{"events": [{"no_id": 1}]}', {"Idempotency-Key": "k"}),
        (b'{"events": [{"id": null}]}', {"Idempotency-Key": "k"}),
    ],
)
def test_malformed_requests_are_bad_requests(api: Api, body: bytes, headers: dict[str, str]) -> None:
    response = api.session.post(
        f"{api.url}/v1/events",
        data=body,
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/json", **headers},
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert "error" in response.json()


def test_outage_fails_requests_until_it_ends(api: Api) -> None:
    events, key = new_events(2), new_key()
    api.set_faults(outage_seconds=2)
    started = time.monotonic()

    statuses = []
    while time.monotonic() - started < 15:
        response = api.post_events(events, key)
        statuses.append(response.status_code)
        if response.status_code == 200:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - started

    assert statuses[-1] == 200, statuses
    assert set(statuses[:-1]) == {503}
    assert len(statuses) > 1
    assert 1.5 <= elapsed < 15
    # Failed attempts stored nothing, so the retry that got through is not a replay.
    assert response.json() == {"accepted": 2}
    ids = [event["id"] for event in events]
    assert api.receipts(ids) == dict.fromkeys(ids, 1)


def test_error_rate_one_fails_every_request_and_stores_nothing(api: Api) -> None:
    before = api.get("/v1/stats")["failures_injected"]
    api.set_faults(error_rate=1.0)
    events = new_events(1)

    statuses = [api.post_events(events, new_key()).status_code for _ in range(3)]

    assert statuses == [503, 503, 503]
    assert api.get("/v1/stats")["failures_injected"] >= before + 3
    assert api.receipts([events[0]["id"]]) == {events[0]["id"]: 0}


def test_rate_limit_sends_retry_after(api: Api) -> None:
    api.set_faults(error_rate=1.0, error_status=429, retry_after=2)

    response = api.post_events(new_events(1), new_key())

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"


def test_latency_is_added_to_ingest_requests(api: Api) -> None:
    api.set_faults(latency_ms=300)
    started = time.monotonic()

    response = api.post_events(new_events(1), new_key())

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3


def test_recent_events_and_stats_are_exposed(api: Api) -> None:
    events = new_events(2)
    assert api.post_events(events, new_key()).status_code == 200

    recent = api.get("/v1/events?limit=10000")["events"]
    stats = api.get("/v1/stats")

    assert events == [event for event in recent if event in events]
    assert set(stats) >= {
        "batches_received",
        "batches_replayed",
        "events_stored",
        "distinct_event_ids",
        "duplicate_event_ids",
        "failures_injected",
    }
    assert api.get("/healthz") == {"status": "ok"}
