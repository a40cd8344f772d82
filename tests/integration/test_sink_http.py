"""The HTTP API sink on the DirectRunner against the stack's stand-in API, with the failures it injects.

Every test sends its own random event ids and asserts only on them, so the suite re-runs against a
long-lived API shared with other tests. Faults are global on that API: each test sets them for as short a
time as it can and clears them in a ``finally``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import uuid4

import apache_beam as beam
import pytest
from apache_beam.metrics import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.direct.direct_runner import DirectRunner
from apache_beam.runners.runner import PipelineRunner

from devstack import bigquery_clients
from devstack.config import StackConfig
from pipelines.local_runner import prism_args
from tests.integration.external_api import ExternalApiClient
from transforms.bigquery_reads import BigQueryReadSettings, run_query
from transforms.model import DeadLetter, EngagementEvent, EnrichedEvent, Stage
from transforms.sinks.bigquery import BigQuerySinkSettings
from transforms.sinks.http_api import HttpSinkSettings, WriteToHttpApi
from transforms.sinks.http_client import ApiClient
from transforms.sinks.http_delivery import RetryPolicy, Verdict
from transforms.sinks.http_intents import (
    INTENTS_TABLE,
    IntentLogSettings,
    IntentsSince,
    IntentWriter,
    batch_of_intent,
)
from transforms.sinks.http_token import TokenSource
from transforms.sinks.http_wire import KEY_PREFIX, Batch, encode_event, event_document, shard_of_event

TIMEOUT = 10
# The 30-second outage; HTTP_SINK_OUTAGE_SECONDS tries others (SPEC: "down for minutes").
OUTAGE_SECONDS = float(os.environ.get("HTTP_SINK_OUTAGE_SECONDS", "30"))
FAST_RETRIES = RetryPolicy(
    max_attempts=100, max_retry_seconds=60, initial_backoff_seconds=0.05, max_backoff_seconds=1.0
)

# The DirectRunner runs a batch pipeline in this process, so a DoFn can hand results back through a
# module-level dict (keyed per run, since tests may share the process).
_collected: dict[str, list[DeadLetter]] = {}
_collected_lock = threading.Lock()


def _collect(dead_letter: DeadLetter, run_id: str) -> None:
    with _collected_lock:
        _collected.setdefault(run_id, []).append(dead_letter)


@dataclass
class SinkRun:
    dead_letters: list[DeadLetter]
    counters: dict[str, int]
    seconds: float


def run_sink(events: list[EnrichedEvent], settings: HttpSinkSettings, runner: PipelineRunner | None = None) -> SinkRun:
    """Runs the sink on Prism (batch) unless told otherwise.

    The sink's streaming graph retries refused batches from processing-time timers set in other timers'
    callbacks, which Python's runners do not run to the end: the FnApiRunner stops with a watermark-pending
    bundle, and the plain DirectRunner hands any pipeline with processing-time timers to its legacy engine,
    which completes the checkpoint's GroupByKey before GroupIntoBatches' end-of-window flush (and fails).
    """
    run_id = str(uuid4())
    started = time.monotonic()
    pipeline = (
        beam.Pipeline(runner=runner)
        if runner is not None
        else beam.Pipeline(options=PipelineOptions(prism_args(streaming=False)))
    )
    dead = pipeline | "Events" >> beam.Create(events, reshuffle=False) | "ToApi" >> WriteToHttpApi(settings)
    dead | "Collect" >> beam.Map(_collect, run_id)
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.monotonic() - started
    # Summed over steps: PostBatches and RetryDeferred count under the same names.
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace("sink.http"))["counters"]:
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + counter.committed
    with _collected_lock:
        dead_letters = _collected.pop(run_id, [])
    return SinkRun(dead_letters, counters, seconds)


def new_events(count: int) -> list[EnrichedEvent]:
    # Random ids far above any BIGSERIAL the stack's database hands out, and below 2**53 (JSON-safe).
    base = random.randrange(2**50, 2**53 - count)
    return [
        EnrichedEvent(
            event=EngagementEvent(
                id=base + offset,
                content_id=uuid4(),
                user_id=uuid4(),
                event_type="play",
                event_ts=datetime(2026, 11, 22, 10, 0, offset % 60, tzinfo=UTC),
                duration_ms=1500,
                device="ios",
                raw_payload='{"k":"v"}',
            ),
            engagement_seconds=Decimal("1.500"),
            engagement_pct=Decimal("0.25"),
            content_type="podcast",
            length_seconds=6,
            title="Integration",
            slug="integration",
            content_missing=False,
        )
        for offset in range(count)
    ]


def ids_of(events: list[EnrichedEvent]) -> list[int]:
    return [enriched.event.id for enriched in events]


TOKEN_VARIABLE = "HTTP_SINK_TEST_TOKEN"


class Api(ExternalApiClient):
    """The stand-in API, plus the sink settings that point at it."""

    def settings(self, **overrides: Any) -> HttpSinkSettings:
        defaults: dict[str, Any] = {
            "endpoint": f"{self.url}/v1/events",
            "token_source": TokenSource(env_var=TOKEN_VARIABLE),
            "batch_size": 100,
            "max_wait_seconds": 1.0,
            "shards": 4,
            "max_in_flight": 4,
            "connect_timeout_seconds": 2.0,
            "read_timeout_seconds": 5.0,
            "retry": FAST_RETRIES,
        }
        return HttpSinkSettings(**{**defaults, **overrides})


@pytest.fixture
def api(stack: StackConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    client = Api(stack)
    # The sink's workers (in this process) read the token where production workers would: from its source.
    monkeypatch.setenv(TOKEN_VARIABLE, client.token)
    yield client
    client.close()


def assert_exactly_once(api: Api, events: list[EnrichedEvent]) -> None:
    receipts = api.receipts(ids_of(events))
    wrong = {event_id: count for event_id, count in receipts.items() if count != 1}
    assert not wrong, f"{len(wrong)} of {len(events)} ids not stored exactly once, e.g. {list(wrong.items())[:5]}"


def assert_token_hidden(token: str, dead_letters: list[DeadLetter], caplog: pytest.LogCaptureFixture) -> None:
    for dead_letter in dead_letters:
        assert token not in dead_letter.reason
        assert token not in (dead_letter.payload_text or "")
    assert token not in caplog.text


def test_clean_delivery_sends_every_event_once_in_schema_v1(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    events = new_events(1200)

    run = run_sink(events, api.settings())

    assert run.dead_letters == []
    assert_exactly_once(api, events)
    assert run.counters["events_sent"] == run.counters["written"] == 1200
    assert run.counters["batches_sent"] >= 12  # 4 shards, at most 100 events per batch
    assert run.counters.get("dead_lettered", 0) == 0
    mine = {enriched.event.id: enriched for enriched in events}
    stored = [event for event in api.get("/v1/events?limit=10000")["events"] if event["id"] in mine]
    assert len(stored) == 1200
    assert all(event == event_document(mine[event["id"]]) for event in stored)
    assert_token_hidden(api.token, [], caplog)


def test_half_the_requests_failing_still_delivers_every_event_once(api: Api) -> None:
    events = new_events(1000)
    api.set_faults(error_rate=0.5, error_status=503, seed=20261122)
    try:
        run = run_sink(events, api.settings())
    finally:
        api.set_faults()

    assert run.dead_letters == []
    assert_exactly_once(api, events)
    assert run.counters["retried"] > 0
    assert run.counters["events_sent"] == 1000


def test_an_outage_is_ridden_out_and_delivered_once_after_it_ends(api: Api) -> None:
    events = new_events(500)
    started = time.monotonic()
    api.set_faults(outage_seconds=OUTAGE_SECONDS)
    try:
        run = run_sink(events, api.settings(retry=replace(FAST_RETRIES, max_backoff_seconds=2.0)))
    finally:
        api.set_faults()

    assert run.dead_letters == []
    assert_exactly_once(api, events)
    assert run.counters["retried"] > 0
    assert run.counters["deferred"] > 0  # refused batches left their bundles instead of waiting in them
    assert time.monotonic() - started >= OUTAGE_SECONDS  # nothing got through during the outage


def test_slow_responses_are_waited_for_several_at_a_time(api: Api) -> None:
    events = new_events(400)
    # One shard of 8 batches of 50, each answered after 1.5 s: 12 s one after another, ~3 s four at a time.
    api.set_faults(latency_ms=1500)
    try:
        run = run_sink(events, api.settings(shards=1, batch_size=50, max_in_flight=4, read_timeout_seconds=5.0))
    finally:
        api.set_faults()

    assert run.dead_letters == []
    assert_exactly_once(api, events)
    assert run.counters["batches_sent"] == 8
    assert run.counters.get("retried", 0) == 0
    assert run.seconds < 9, f"took {run.seconds:.1f}s: batches were not sent concurrently"


def test_bad_requests_dead_letter_every_event_of_their_batches(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    events = new_events(250)
    api.set_faults(error_rate=1.0, error_status=400)
    try:
        run = run_sink(events, api.settings())
    finally:
        api.set_faults()

    assert api.receipts(ids_of(events)) == dict.fromkeys(ids_of(events), 0)
    assert sorted(dead.event_id for dead in run.dead_letters) == sorted(ids_of(events))
    assert run.counters["dead_lettered"] == 250
    assert run.counters.get("retried", 0) == 0  # a 400 is never retried
    by_id = {enriched.event.id: enriched for enriched in events}
    for dead in run.dead_letters:
        assert dead.stage is Stage.HTTP
        assert "rejected: HTTP 400" in dead.reason
        assert "failure (injected)" in dead.reason  # the response body excerpt
        assert KEY_PREFIX in dead.reason
        assert dead.payload_bytes == encode_event(by_id[dead.event_id])
        assert (dead.source.kind, dead.source.table, dead.source.row_id) == (
            "postgres",
            "engagement_events",
            dead.event_id,
        )
    assert_token_hidden(api.token, run.dead_letters, caplog)


def test_a_wrong_token_dead_letters_without_showing_any_token(
    api: Api, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    events = new_events(20)
    wrong = f"wrong-{uuid4()}"
    monkeypatch.setenv("HTTP_SINK_TEST_WRONG_TOKEN", wrong)

    run = run_sink(events, api.settings(token_source=TokenSource(env_var="HTTP_SINK_TEST_WRONG_TOKEN")))

    assert len(run.dead_letters) == 20
    assert all("rejected: HTTP 401" in dead.reason for dead in run.dead_letters)
    assert api.receipts(ids_of(events)) == dict.fromkeys(ids_of(events), 0)
    assert_token_hidden(wrong, run.dead_letters, caplog)
    assert_token_hidden(api.token, run.dead_letters, caplog)


def test_the_bearer_token_is_sent_even_when_netrc_has_the_apis_host(
    api: Api, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests puts a ~/.netrc entry's Basic credentials in place of a session's default Authorization header.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password something-else\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    events = new_events(3)
    batch = Batch.of((enriched.event.id, encode_event(enriched)) for enriched in events)
    client = ApiClient(api.settings())
    try:
        attempt = client.send(batch)
    finally:
        client.close()

    assert (attempt.verdict, attempt.status) == (Verdict.DELIVERED, 200), attempt.detail
    assert api.receipts(ids_of(events)) == dict.fromkeys(ids_of(events), 1)


def test_rate_limiting_honours_retry_after(api: Api) -> None:
    events = new_events(10)
    baseline = api.get("/v1/stats")["failures_injected"]
    api.set_faults(error_rate=1.0, error_status=429, retry_after=3)

    def lift_after_first_rejection() -> None:
        # Keep answering 429 for 1 s after the first one: a client ignoring Retry-After (backoff here is
        # 0.05-1 s) would retry several times inside that second; one honouring it retries once, at 3 s.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and api.get("/v1/stats")["failures_injected"] == baseline:
            time.sleep(0.02)
        time.sleep(1.0)
        api.set_faults()

    lifter = threading.Thread(target=lift_after_first_rejection, daemon=True)
    lifter.start()
    try:
        run = run_sink(events, api.settings(shards=1, retry=replace(FAST_RETRIES, initial_backoff_seconds=0.2)))
    finally:
        lifter.join(timeout=70)
        api.set_faults()

    assert run.dead_letters == []
    assert_exactly_once(api, events)
    assert run.counters["retried"] == 1
    assert run.seconds >= 3


def test_a_replayed_batch_is_stored_once_and_reported(api: Api) -> None:
    """The same batches posted again, as when a runner retries the bundle after the API answered."""
    events = new_events(300)
    settings = api.settings(shards=3, batch_size=1000)  # one batch per shard, the same on every run
    replays_before = api.get("/v1/stats")["batches_replayed"]

    first = run_sink(events, settings)
    again = run_sink(list(reversed(events)), settings)

    assert first.dead_letters == again.dead_letters == []
    assert_exactly_once(api, events)
    assert first.counters.get("replayed", 0) == 0
    assert again.counters["replayed"] == again.counters["batches_sent"] == 3
    assert api.get("/v1/stats")["batches_replayed"] >= replays_before + 3


def test_a_batch_key_identifies_its_events_whoever_sends_it(api: Api) -> None:
    """The key the sink sends is the documented one: another sender of the same ids gets a replay."""
    events = new_events(5)
    run = run_sink(events, api.settings(shards=1))
    assert run.counters["batches_sent"] == 1

    batch = Batch.of((enriched.event.id, encode_event(enriched)) for enriched in events)
    response = api.session.post(
        f"{api.url}/v1/events",
        data=batch.body(),
        headers={"Authorization": f"Bearer {api.token}", "Idempotency-Key": batch.key},
        timeout=TIMEOUT,
    )

    assert response.headers.get("Idempotent-Replayed") == "true"
    assert_exactly_once(api, events)


def test_an_unreachable_endpoint_dead_letters_after_the_retry_limit() -> None:
    # Needs no stack: a loopback port nobody listens on refuses connections.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = HttpSinkSettings(
        endpoint=f"http://127.0.0.1:{port}/v1/events",
        token_source=TokenSource(env_var="PATH"),  # any non-empty variable: nobody listens
        retry=RetryPolicy(max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02),
    )
    events = new_events(7)

    run = run_sink(events, settings)

    assert sorted(dead.event_id for dead in run.dead_letters) == sorted(ids_of(events))
    assert all("gave up after 3 attempts" in dead.reason for dead in run.dead_letters)
    assert all("ConnectionError" in dead.reason for dead in run.dead_letters)
    batches = len({shard_of_event(event_id, settings.shards) for event_id in ids_of(events)})
    assert run.counters["retried"] == 2 * batches  # 3 attempts each


def test_without_the_checkpoint_the_sink_runs_on_the_plain_direct_runner(api: Api) -> None:
    """checkpoint_batches=False is what makes the sink usable in DirectRunner pipelines (docs/http-sink.md)."""
    events = new_events(250)

    run = run_sink(events, api.settings(checkpoint_batches=False), runner=DirectRunner())

    assert run.dead_letters == []
    assert_exactly_once(api, events)


def intent_log(stack: StackConfig, dataset: str) -> IntentLogSettings:
    spec = BigQuerySinkSettings(stack.bq_project, dataset).table_spec(INTENTS_TABLE, INTENTS_TABLE)
    return IntentLogSettings(spec=spec, endpoint=stack.bq_grpc_endpoint)


def intents_since(stack: StackConfig, dataset: str, since: datetime) -> IntentsSince:
    read = BigQueryReadSettings(
        stack.bq_project, dataset, "enriched_events", "window_aggregates", rest_endpoint=stack.bq_rest_endpoint
    )
    return IntentsSince(read, INTENTS_TABLE, since)


def test_every_batch_is_recorded_before_it_is_posted(api: Api, stack: StackConfig, dataset: str) -> None:
    """The intent log (transforms/sinks/http_intents.py) holds each batch as sent, also one the API never got."""
    since = datetime.now(UTC)  # the module shares one dataset: only this test's intents
    delivered = new_events(250)
    run = run_sink(delivered, api.settings(intents=intent_log(stack, dataset)))
    assert run.dead_letters == []

    with socket.socket() as probe:  # a port nobody listens on: every POST fails to connect
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    undeliverable = new_events(30)
    refused = api.settings(
        endpoint=f"http://127.0.0.1:{closed_port}/v1/events",
        intents=intent_log(stack, dataset),
        retry=RetryPolicy(max_attempts=2, initial_backoff_seconds=0.01, max_backoff_seconds=0.02),
    )
    run = run_sink(undeliverable, refused)
    assert sorted(dead.event_id for dead in run.dead_letters) == sorted(ids_of(undeliverable))

    intents = intents_since(stack, dataset, since)
    assert intents.ids() == frozenset(ids_of(delivered) + ids_of(undeliverable))
    client = bigquery_clients.rest_client(stack.bq_rest_endpoint, stack.bq_project)
    rows = list(run_query(client, intents.query()))
    by_key = {
        row["idempotency_key"]: batch_of_intent(row["idempotency_key"], row["event_ids"], row["body"]) for row in rows
    }
    # Each recorded batch is what was (or would have been) sent: its key hashes its ids, its body re-forms it.
    assert all(batch.key == key for key, batch in by_key.items())
    assert sorted(i for batch in by_key.values() for i in batch.event_ids) == sorted(intents.ids())
    mine = {enriched.event.id: encode_event(enriched) for enriched in delivered + undeliverable}
    assert all(payload == mine[event_id] for batch in by_key.values() for event_id, payload in batch.events)


def test_a_resume_sends_recorded_batches_again_with_their_keys(api: Api, stack: StackConfig, dataset: str) -> None:
    """A stop can fall between a batch's intent and its POST. The resume re-sends every recorded batch as it
    was: the API answers the delivered ones as replays and stores the others; no event is stored twice, even
    though the re-read events would otherwise form new batches with new keys."""
    since = datetime.now(UTC)  # the module shares one dataset: only this test's intents
    log = intent_log(stack, dataset)
    delivered = new_events(300)
    run = run_sink(delivered, api.settings(intents=log))
    assert run.dead_letters == []
    # Recorded, then the job stopped before posting them: the intents exist, the API never saw the batches.
    cut_short = new_events(40)
    writer = IntentWriter(log)
    try:
        writer.record(
            [
                Batch.of((e.event.id, encode_event(e)) for e in cut_short if e.event.id % 4 == shard)
                for shard in range(4)
            ]
        )
    finally:
        writer.close()
    assert api.receipts(ids_of(cut_short)) == dict.fromkeys(ids_of(cut_short), 0)
    never_sent = new_events(60)

    # The resumed job re-reads all three groups; it skips the recorded events and re-sends their batches.
    intents = intents_since(stack, dataset, since)
    held = intents.ids()
    reread = [e for e in delivered + cut_short + never_sent if e.event.id not in held]
    assert ids_of(reread) == ids_of(never_sent)
    run = run_sink(reread, api.settings(intents=log, replay=intents))

    assert run.dead_letters == []
    assert_exactly_once(api, delivered + cut_short + never_sent)
    delivered_batches = run.counters["intents_resent"] - 4
    assert delivered_batches >= 3  # 300 events, at most 100 per batch
    assert run.counters["replayed"] == delivered_batches
    assert run.counters["events_sent"] == 300 + 40 + 60
