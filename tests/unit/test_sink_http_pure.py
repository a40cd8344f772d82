"""The HTTP API sink's rules, without a network: wire format, batch keys, retry classification and timing."""

import hashlib
import json
import pickle
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from email.utils import format_datetime
from uuid import UUID

import apache_beam as beam
import pytest
import requests
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.timestamp import Timestamp

from transforms import secrets
from transforms.model import EngagementEvent, EnrichedEvent
from transforms.sinks.http_api import DEFERRED_TAG, HttpSinkSettings, PostBatchesFn, WriteToHttpApi
from transforms.sinks.http_client import SinkCounters
from transforms.sinks.http_deferred import DeferredBatch, RetryDeferredBatchesFn, next_round_wait
from transforms.sinks.http_delivery import (
    Attempt,
    DeliveryInterruptedError,
    RetryPolicy,
    Verdict,
    classify_exception,
    classify_status,
    deliver,
    parse_retry_after,
)
from transforms.sinks.http_intents import UnreplayableIntentError, batch_of_intent, intent_row
from transforms.sinks.http_token import Secret, TokenSource, redact
from transforms.sinks.http_wire import (
    KEY_PREFIX,
    TIMESTAMP_FORMAT,
    Batch,
    display_url,
    encode_event,
    event_document,
    idempotency_key,
    shard_of_event,
)

CONTENT_ID = UUID("11111111-1111-4111-8111-111111111111")
USER_ID = UUID("00000000-0000-4000-8000-000000000001")
TOKEN = "s3cr3t-token-value"
BQ = "--bigquery_project=p"  # the intent log lives in the BigQuery sink's dataset
SOURCE = TokenSource(env_var="HTTP_SINK_TEST_TOKEN")


def enriched(event_id: int = 7, **overrides) -> EnrichedEvent:
    fields = {
        "event": EngagementEvent(
            id=event_id,
            content_id=CONTENT_ID,
            user_id=USER_ID,
            event_type="play",
            # 11:00:30.25 at +01:00 is 10:00:30.25 UTC.
            event_ts=datetime(2026, 11, 22, 11, 0, 30, 250000, tzinfo=timezone(timedelta(hours=1))),
            duration_ms=1500,
            device="web-safari",
            raw_payload='{"a":1}',
        ),
        "engagement_seconds": Decimal("1.500"),
        "engagement_pct": Decimal("0.13"),
        "content_type": "podcast",
        "length_seconds": 12,
        "title": "Déjà vu",
        "slug": "deja-vu",
        "content_missing": False,
        **overrides,
    }
    return EnrichedEvent(**fields)


# --- wire format ---


def test_event_document_schema_v1():
    assert event_document(enriched()) == {
        "id": 7,
        "content_id": str(CONTENT_ID),
        "user_id": str(USER_ID),
        "event_type": "play",
        "event_ts": "2026-11-22T10:00:30.250000Z",
        "duration_ms": 1500,
        "device": "web-safari",
        "raw_payload": '{"a":1}',
        "engagement_seconds": "1.500",
        "engagement_pct": "0.13",
        "content_type": "podcast",
        "length_seconds": 12,
        "title": "Déjà vu",
        "slug": "deja-vu",
        "content_missing": False,
    }


def test_event_document_keeps_every_null():
    event = EngagementEvent(id=8, event_ts=datetime(2026, 11, 22, 10, 0, tzinfo=UTC))
    document = event_document(
        EnrichedEvent(
            event=event,
            engagement_seconds=None,
            engagement_pct=None,
            content_type=None,
            length_seconds=None,
            title=None,
            slug=None,
            content_missing=True,
        )
    )
    assert document["event_ts"] == "2026-11-22T10:00:00.000000Z"
    assert document["content_missing"] is True
    assert [name for name, value in document.items() if value is None] == [
        "content_id",
        "user_id",
        "event_type",
        "duration_ms",
        "device",
        "raw_payload",
        "engagement_seconds",
        "engagement_pct",
        "content_type",
        "length_seconds",
        "title",
        "slug",
    ]


def test_decimals_are_fixed_point_strings_never_exponents():
    document = event_document(enriched(engagement_seconds=Decimal("0E-3"), engagement_pct=Decimal("1E+1")))
    assert (document["engagement_seconds"], document["engagement_pct"]) == ("0.000", "10")


def test_encoded_event_is_compact_utf8_json_and_deterministic():
    encoded = encode_event(enriched())
    assert encoded == encode_event(enriched())
    assert json.loads(encoded) == event_document(enriched())
    assert b" " not in encoded.replace("Déjà vu".encode(), b"")
    assert "Déjà".encode() in encoded  # UTF-8, not \u escapes


# Text a title, a device or a payload may carry: quotes, backslashes, every control character, DEL, the line and
# paragraph separators JavaScript treats as line ends, and characters outside the Basic Multilingual Plane.
AWKWARD_TEXTS = ['"quoted" \\ back', "".join(map(chr, range(32))) + "\x7f", "\u2028\u2029", "emoji 🎧 ∑ é", ""]


@pytest.mark.parametrize("text", AWKWARD_TEXTS)
def test_encoded_event_is_the_bytes_the_standard_library_writes(text):
    event = enriched().event.model_copy(update={"device": text, "raw_payload": json.dumps(text), "id": 2**63 - 1})
    document = enriched(event=event, title=text, slug=None, engagement_pct=None)
    standard = json.dumps(event_document(document), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    assert encode_event(document) == standard.encode("utf-8")


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 11, 22, 10, 0, 30, 250000, tzinfo=UTC),
        datetime(2026, 11, 22, 10, 0, 30, tzinfo=UTC),  # no fraction: still six digits
        datetime(2026, 3, 29, 3, 30, tzinfo=timezone(timedelta(hours=2))),
        datetime(999, 1, 1, tzinfo=UTC),  # a year below 1000, which isoformat and strftime write differently
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_event_times_are_written_as_the_format_says(moment):
    event = enriched().event.model_copy(update={"event_ts": moment})
    written = event_document(enriched(event=event))["event_ts"]
    assert written == moment.astimezone(UTC).strftime(TIMESTAMP_FORMAT)


# --- batches and keys ---


def test_shard_is_stable_and_in_range():
    shards = [shard_of_event(event_id, 8) for event_id in range(10_000)]
    assert set(shards) == set(range(8))
    assert max(shards.count(s) for s in range(8)) < 1.2 * 10_000 / 8  # spread evenly
    # crc32 of "123456789": the same on every worker
    assert shard_of_event(123456789, 8) == shard_of_event(123456789, 8) == 6


def test_idempotency_key_depends_only_on_the_set_of_ids():
    expected = KEY_PREFIX + hashlib.sha256(b"2,10,33").hexdigest()
    assert idempotency_key([33, 2, 10]) == idempotency_key([10, 33, 2]) == expected
    assert idempotency_key([2, 10]) != expected
    assert idempotency_key([2, 10, 34]) != expected
    # Numeric, not lexicographic, order: 10 sorts after 2.
    assert idempotency_key([10, 2]) == KEY_PREFIX + hashlib.sha256(b"2,10").hexdigest()


def test_batch_is_canonical_whatever_the_order_it_was_grouped_in():
    events = [(3, b'{"id":3}'), (1, b'{"id":1}'), (2, b'{"id":2}')]
    first, regrouped = Batch.of(events), Batch.of(reversed(events))

    assert first == regrouped
    assert first.body() == regrouped.body() == b'{"events":[{"id":1},{"id":2},{"id":3}]}'
    assert first.key == regrouped.key == idempotency_key([1, 2, 3])
    assert json.loads(first.body()) == {"events": [{"id": 1}, {"id": 2}, {"id": 3}]}


def test_batch_sends_a_repeated_id_once():
    batch = Batch.of([(5, b'{"id":5,"v":"b"}'), (4, b'{"id":4}'), (5, b'{"id":5,"v":"a"}')])
    assert batch.event_ids == [4, 5]
    assert batch.body() == b'{"events":[{"id":4},{"id":5,"v":"a"}]}'


# --- the intent log ---


def test_an_intent_re_forms_its_batch_byte_for_byte():
    awkward = [
        enriched(9, title='quote " backslash \\ tab \t emoji \U0001f600 nul-free', slug=None),
        enriched(3, content_missing=True, content_type=None, title=None, slug=None, length_seconds=None),
        enriched(5, event=enriched(5).event.model_copy(update={"raw_payload": None, "duration_ms": -4})),
        enriched(2**53 - 1),
    ]
    batch = Batch.of((e.event.id, encode_event(e)) for e in awkward)
    row = intent_row(batch, NOW)

    assert row["event_ids"] == f"3,5,9,{2**53 - 1}"
    assert row["idempotency_key"] == batch.key == idempotency_key([3, 5, 9, 2**53 - 1])
    assert row["event_count"] == 4
    rebuilt = batch_of_intent(row["idempotency_key"], row["event_ids"], row["body"])
    assert rebuilt == batch
    assert rebuilt.body() == batch.body()


def test_an_intent_that_does_not_re_form_its_batch_is_refused():
    batch = Batch.of((e.event.id, encode_event(e)) for e in (enriched(1), enriched(2)))
    row = intent_row(batch, NOW)
    spaced = row["body"].replace('"id":1,', '"id": 1,')  # the same events, other bytes: not what was sent

    with pytest.raises(UnreplayableIntentError, match="does not re-form"):
        batch_of_intent(row["idempotency_key"], row["event_ids"], spaced)
    with pytest.raises(UnreplayableIntentError, match="does not re-form"):
        batch_of_intent(idempotency_key([1]), row["event_ids"], row["body"])
    with pytest.raises(UnreplayableIntentError, match="not a batch"):
        batch_of_intent(row["idempotency_key"], row["event_ids"], '{"events": "nope"}')


# --- retry classification ---


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (201, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (502, Verdict.RETRY),
        (503, Verdict.RETRY),
        (504, Verdict.RETRY),
        (599, Verdict.RETRY),
        (301, Verdict.REJECTED),
        (307, Verdict.REJECTED),
        (400, Verdict.REJECTED),
        (401, Verdict.REJECTED),
        (403, Verdict.REJECTED),
        (404, Verdict.REJECTED),
        (409, Verdict.REJECTED),
        (413, Verdict.REJECTED),
        (422, Verdict.REJECTED),
    ],
)
def test_status_classification(status, verdict):
    assert classify_status(status) is verdict


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (requests.ConnectionError("refused"), Verdict.RETRY),
        (requests.ConnectTimeout("slow connect"), Verdict.RETRY),
        (requests.ReadTimeout("slow response"), Verdict.RETRY),
        (requests.exceptions.ChunkedEncodingError("cut off"), Verdict.RETRY),
        (requests.exceptions.InvalidURL("bad"), Verdict.REJECTED),
        (requests.exceptions.InvalidHeader("bad"), Verdict.REJECTED),
    ],
)
def test_exception_classification(error, verdict):
    assert classify_exception(error) is verdict


NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        ("Sun, 22 Nov 2026 10:00:45 GMT", 45.0),
        ("Sun, 22 Nov 2026 09:59:00 GMT", 0.0),  # in the past: retry now
        ("-1", None),
        ("1.5", None),
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_parsing(header, seconds):
    assert parse_retry_after(header, NOW) == seconds


def test_backoff_ceiling_doubles_up_to_the_cap():
    policy = RetryPolicy(initial_backoff_seconds=0.5, max_backoff_seconds=30)
    assert [policy.backoff.ceiling(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.backoff.ceiling(10_000) == 30  # no overflow on absurd attempt counts


def test_delay_is_full_jitter_with_retry_after_as_a_capped_floor():
    policy = RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=8, retry_after_cap_seconds=60)
    assert policy.delay(3, None, lambda: 0.0) == 0.0
    assert policy.delay(3, None, lambda: 0.5) == 2.0
    assert policy.delay(3, None, lambda: 0.999) == pytest.approx(3.996)
    assert policy.delay(1, 5.0, lambda: 0.5) == 5.0  # Retry-After wins over a shorter backoff
    assert policy.delay(5, 2.0, lambda: 1.0) == 8.0  # and never shortens a longer one
    assert policy.delay(1, 3600.0, lambda: 0.0) == 60.0  # capped


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"initial_backoff_seconds": 0},
        {"max_retry_seconds": -1},
        {"initial_backoff_seconds": 5, "max_backoff_seconds": 1},
    ],
)
def test_retry_policy_rejects_nonsense(kwargs):
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)


# --- the retry loop, with scripted responses and a fake clock ---


class Script:
    """Plays back attempts and records the waits, advancing a fake clock instead of sleeping."""

    def __init__(self, *attempts: Attempt, send_seconds: float = 0.0) -> None:
        self.attempts = list(attempts)
        self.sent = 0
        self.waits: list[float] = []
        self.now = 0.0
        self.send_seconds = send_seconds

    def send(self) -> Attempt:
        self.sent += 1
        self.now += self.send_seconds
        return self.attempts.pop(0)

    def sleep(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        return True

    def clock(self) -> float:
        return self.now

    def run(self, policy: RetryPolicy = RetryPolicy(), uniform: float = 0.5):
        return deliver(self.send, policy, self.sleep, self.clock, lambda: uniform)


OK = Attempt(Verdict.DELIVERED, status=200)
UNAVAILABLE = Attempt(Verdict.RETRY, status=503, detail='{"error": "outage"}')
REFUSED = Attempt(Verdict.RETRY, detail="ConnectionError: refused")


def test_delivered_at_once():
    script = Script(OK)
    delivery = script.run()
    assert (delivery.delivered, delivery.attempts, delivery.retries, script.waits) == (True, 1, 0, [])


def test_transient_failures_are_retried_with_growing_waits():
    script = Script(UNAVAILABLE, REFUSED, UNAVAILABLE, OK)
    delivery = script.run(RetryPolicy(initial_backoff_seconds=1, max_backoff_seconds=100))
    assert (delivery.delivered, delivery.retries) == (True, 3)
    assert script.waits == [0.5, 1.0, 2.0]  # half of each ceiling, with uniform() = 0.5


def test_replay_is_reported():
    delivery = Script(UNAVAILABLE, Attempt(Verdict.DELIVERED, status=200, replayed=True)).run()
    assert (delivery.delivered, delivery.replayed) == (True, True)


def test_rejection_is_final_and_not_retried():
    script = Script(Attempt(Verdict.REJECTED, status=400, detail='{"error": "bad body"}'), OK)
    delivery = script.run()
    assert (delivery.delivered, delivery.attempts, script.waits) == (False, 1, [])
    assert delivery.reason == 'rejected: HTTP 400: {"error": "bad body"}'


def test_gives_up_after_max_attempts():
    script = Script(*[UNAVAILABLE] * 3, OK)
    delivery = script.run(RetryPolicy(max_attempts=3))
    assert (delivery.delivered, delivery.attempts, script.sent) == (False, 3, 3)
    assert delivery.reason.startswith("gave up after 3 attempts")
    assert delivery.reason.endswith('last: HTTP 503: {"error": "outage"}')


def test_gives_up_before_a_wait_that_would_pass_the_retry_budget():
    # Each attempt takes 4 s (a timeout); waits are 0.5, 1, 2, 4 ... with uniform() = 0.5.
    script = Script(*[REFUSED] * 10, send_seconds=4.0)
    delivery = script.run(RetryPolicy(max_retry_seconds=20, initial_backoff_seconds=1, max_backoff_seconds=100))
    # t=4 wait .5, t=8.5 wait 1, t=13.5 wait 2, t=19.5: a wait of 4 would end at 23.5 > 20.
    assert (delivery.delivered, delivery.attempts, script.waits) == (False, 4, [0.5, 1.0, 2.0])
    assert "retry budget" in delivery.reason
    assert script.now <= 20


def test_retry_after_is_honoured():
    limited = Attempt(Verdict.RETRY, status=429, retry_after=7.0, detail="slow down")
    script = Script(limited, OK)
    delivery = script.run(RetryPolicy(initial_backoff_seconds=0.1, max_backoff_seconds=1))
    assert delivery.delivered
    assert script.waits == [7.0]


def test_retry_after_beyond_the_budget_dead_letters_at_once():
    limited = Attempt(Verdict.RETRY, status=429, retry_after=100.0, detail="slow down")
    script = Script(limited, OK)
    delivery = script.run(RetryPolicy(max_retry_seconds=60, retry_after_cap_seconds=300))
    assert (delivery.delivered, script.sent, script.waits) == (False, 1, [])


def test_interrupted_wait_fails_instead_of_dead_lettering():
    with pytest.raises(DeliveryInterruptedError):
        deliver(lambda: UNAVAILABLE, RetryPolicy(), lambda _seconds: False)


# --- the token ---


def test_secret_never_shows_itself():
    secret = Secret(TOKEN)
    assert TOKEN not in repr(secret)
    assert TOKEN not in str(secret)
    assert TOKEN not in f"{secret} {secret!r} {[secret]} { ({'token': secret}) }"
    assert pickle.loads(pickle.dumps(secret)).reveal() == TOKEN  # noqa: S301 - survives shipping to workers


def test_token_from_environment_variable(monkeypatch):
    monkeypatch.setenv("HTTP_SINK_TEST_TOKEN", f" {TOKEN}\n")
    assert TokenSource(env_var="HTTP_SINK_TEST_TOKEN").read().reveal() == TOKEN


def test_token_from_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert TokenSource(file_path=str(path)).read().reveal() == TOKEN


def test_token_from_a_secret_manager_version(monkeypatch):
    # Secret Manager has no local equivalent: the client call is replaced, the name handling is real.
    read = []
    monkeypatch.setattr(secrets, "read_secret_version", lambda name: read.append(name) or TOKEN)
    assert TokenSource(secret_version="projects/p/secrets/s/versions/2").read().reveal() == TOKEN
    assert read == ["projects/p/secrets/s/versions/2"]


def test_token_errors_name_the_source_not_the_value(monkeypatch, tmp_path):
    monkeypatch.delenv("HTTP_SINK_TEST_TOKEN", raising=False)
    with pytest.raises(ValueError, match="HTTP_SINK_TEST_TOKEN"):
        TokenSource(env_var="HTTP_SINK_TEST_TOKEN").read()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        TokenSource(file_path=str(empty)).read()
    with pytest.raises(ValueError, match="cannot read"):
        TokenSource(file_path=str(tmp_path / "absent")).read()
    with pytest.raises(ValueError, match="exactly one"):
        TokenSource(env_var="A", file_path="b")
    with pytest.raises(ValueError, match="exactly one"):
        TokenSource()


def test_the_settings_carry_where_the_token_is_not_the_token(monkeypatch):
    # The settings are pickled into the job graph; only the source may travel (on Dataflow, to pipeline.pb).
    monkeypatch.setenv("HTTP_SINK_TEST_TOKEN", TOKEN)
    options = PipelineOptions(
        ["--http_api_url=https://api.example.com/v1/events", "--http_api_token_env=HTTP_SINK_TEST_TOKEN", BQ]
    )
    settings = HttpSinkSettings.from_options(options)
    assert TOKEN.encode() not in pickle.dumps(settings)
    assert TOKEN.encode() not in pickle.dumps(PostBatchesFn(settings))
    assert TOKEN.encode() not in pickle.dumps(RetryDeferredBatchesFn(settings))


def test_redaction_and_display_url():
    assert redact(f"echo: Authorization: Bearer {TOKEN}", Secret(TOKEN)) == "echo: Authorization: Bearer ***"
    assert display_url("https://user:pw@api.example.com:8443/v1/events?api_key=k") == (
        "https://api.example.com:8443/v1/events"
    )


# --- options ---


def test_options_build_settings(monkeypatch):
    monkeypatch.setenv("MY_TOKEN_VAR", TOKEN)
    options = PipelineOptions(
        [
            "--http_api_url=https://api.example.com/v1/events",
            "--http_api_token_env=MY_TOKEN_VAR",
            "--http_api_batch_size=100",
            "--http_api_max_wait_seconds=0.5",
            "--http_api_shards=2",
            "--http_api_max_in_flight=3",
            "--http_api_max_attempts=5",
            "--http_api_max_retry_seconds=60",
            BQ,
        ]
    )
    settings = HttpSinkSettings.from_options(options)
    assert settings is not None
    assert settings.intents is not None
    assert settings.intents.spec.table_id == "p.engagement.http_intents"
    assert settings.intents.endpoint is None  # Google's BigQuery
    assert settings.replay is None
    assert (settings.batch_size, settings.max_wait_seconds, settings.shards, settings.max_in_flight) == (100, 0.5, 2, 3)
    assert (settings.retry.max_attempts, settings.retry.max_retry_seconds) == (5, 60)
    assert settings.token_source == TokenSource(env_var="MY_TOKEN_VAR")
    assert TOKEN not in repr(settings)


def test_the_intent_log_is_written_where_the_bigquery_sink_writes(monkeypatch):
    monkeypatch.setenv("HTTP_API_TOKEN", TOKEN)
    url = "--http_api_url=http://127.0.0.1:1/v1/events"
    local = [
        "--bigquery_write_method=local_storage_write",
        "--bigquery_endpoint=127.0.0.1:9060",
        "--bigquery_dataset=d",
    ]
    settings = HttpSinkSettings.from_options(PipelineOptions([url, BQ, *local, "--http_api_intents_table=intents"]))
    assert settings.intents.spec.table_id == "p.d.intents"
    assert settings.intents.endpoint == "127.0.0.1:9060"
    assert [c.name for c in settings.intents.spec.columns][:3] == ["idempotency_key", "event_ids", "body"]
    assert HttpSinkSettings.from_options(PipelineOptions([url, BQ, "--http_api_intents_table="])).intents is None


def test_token_file_option_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HTTP_API_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text(TOKEN)
    options = PipelineOptions(["--http_api_url=http://127.0.0.1:1/v1/events", f"--http_api_token_file={path}", BQ])
    settings = HttpSinkSettings.from_options(options)
    assert settings is not None
    assert settings.token_source == TokenSource(file_path=str(path))


def test_a_secret_outranks_the_variable_and_is_not_read_while_the_graph_is_built(monkeypatch):
    monkeypatch.setattr(secrets, "read_secret_version", lambda name: pytest.fail("read at build time"))
    secret = "projects/p/secrets/token/versions/4"
    options = PipelineOptions(
        ["--http_api_url=https://api.example.com/v1/events", f"--http_api_token_secret={secret}", BQ]
    )
    assert HttpSinkSettings.from_options(options).token_source == TokenSource(secret_version=secret)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--http_api_token_secret=token-value"], "is not projects/PROJECT"),
        (["--http_api_token_secret=projects/p/secrets/s/versions/1", "--http_api_token_file=/t"], "not both"),
        (["--runner=DataflowRunner"], "on Dataflow the workers read the HTTP API token themselves"),
    ],
)
def test_token_options_that_cannot_work_are_refused(monkeypatch, arguments, message):
    monkeypatch.setenv("HTTP_API_TOKEN", TOKEN)
    options = PipelineOptions(["--http_api_url=https://api.example.com/v1/events", *arguments])
    with pytest.raises(ValueError, match=message):
        HttpSinkSettings.from_options(options)


def test_disabled_sink_needs_nothing_else():
    assert HttpSinkSettings.from_options(PipelineOptions(["--http_api_sink=disabled"])) is None


def test_enabled_sink_needs_an_url():
    with pytest.raises(ValueError, match="--http_api_url"):
        HttpSinkSettings.from_options(PipelineOptions([]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"endpoint": "ftp://api.example.com/"},
        {"endpoint": "not a url"},
        {"batch_size": 0},
        {"shards": 0},
        {"max_in_flight": 0},
        {"max_wait_seconds": 0},
        {"read_timeout_seconds": 0},
    ],
)
def test_settings_reject_nonsense(overrides):
    with pytest.raises(ValueError, match="must"):
        HttpSinkSettings(**{"endpoint": "https://api.example.com/v1/events", "token_source": SOURCE, **overrides})


@pytest.mark.parametrize(("checkpoint", "expected"), [(True, True), (False, False)])
def test_the_checkpoint_sits_between_batching_and_posting(checkpoint, expected):
    settings = HttpSinkSettings("https://api.example.com/v1/events", SOURCE, checkpoint_batches=checkpoint)
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([enriched()]) | "Sink" >> WriteToHttpApi(settings)
    labels = [t.full_label for t in pipeline.transforms_stack[0].parts[-1].parts]
    assert labels[:3] == ["Sink/GlobalWindow", "Sink/EncodeAndShard", "Sink/Batch per shard"]
    assert labels[-3:] == ["Sink/PostBatches", "Sink/RetryDeferred", "Sink/Dead letters"]
    assert ("Sink/PersistBatches" in labels) is expected


def test_a_bounded_run_retries_in_posting_and_has_no_deferred_step():
    settings = HttpSinkSettings("https://api.example.com/v1/events", SOURCE, bounded_input=True)
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([enriched()]) | "Sink" >> WriteToHttpApi(settings)
    labels = [t.full_label for t in pipeline.transforms_stack[0].parts[-1].parts]
    assert labels[-2:] == ["Sink/PostBatches", "Sink/Dead letters"]


# --- streaming: a refused batch leaves its bundle at once and is retried in rounds from state ---


def unreachable_endpoint() -> str:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1/events"


def test_a_streaming_bundle_tries_a_refused_batch_once_and_hands_it_on(monkeypatch):
    # With a 300 s retry budget, a bundle that retried in place would hold its runner slot for minutes.
    monkeypatch.setenv("HTTP_SINK_TEST_TOKEN", TOKEN)
    fn = PostBatchesFn(HttpSinkSettings(unreachable_endpoint(), SOURCE, retry=RetryPolicy(max_retry_seconds=300)))
    fn.setup()
    started = time.monotonic()
    try:
        fn.start_bundle()
        keyed_batch = (3, [(2, b'{"id":2}'), (1, b'{"id":1}')])
        outputs = [*fn.process(keyed_batch, Timestamp.of(0)), *fn.finish_bundle()]
    finally:
        fn.teardown()

    assert time.monotonic() - started < 5
    [output] = outputs
    assert isinstance(output, TaggedOutput)
    assert output.tag == DEFERRED_TAG
    shard, deferred = output.value.value
    assert shard == 3
    assert deferred.batch == Batch(((1, b'{"id":1}'), (2, b'{"id":2}')))
    assert (deferred.attempts, deferred.last.verdict) == (1, Verdict.RETRY)
    assert "ConnectionError" in deferred.last.detail


class FakeState:
    def __init__(self, values=None) -> None:
        self.values = list(values or [])

    def read(self):
        return self.values[0] if self.values else None

    def write(self, value) -> None:
        self.values = [value]

    def clear(self) -> None:
        self.values = []


class FakeBag(FakeState):
    def read(self):
        return list(self.values)

    def add(self, value) -> None:
        self.values.append(value)


class FakeTimer:
    def __init__(self) -> None:
        self.at = None

    def set(self, timestamp) -> None:
        self.at = float(timestamp)


class ScriptedApi:
    """Answers each batch by its first event id; records what was sent."""

    endpoint_shown = "http://api.example.com/v1/events"

    def __init__(self, answers: dict[int, Attempt]) -> None:
        self.answers = answers
        self.sent: list[int] = []

    def send(self, batch: Batch) -> Attempt:
        self.sent.append(batch.events[0][0])
        return self.answers[batch.events[0][0]]


def deferred_batch(event_id: int, age_seconds: float, attempts: int = 1) -> DeferredBatch:
    batch = Batch(((event_id, b"{}"),))
    return DeferredBatch(batch, time.time() - age_seconds, attempts, UNAVAILABLE)


def run_round(answers: dict[int, Attempt], waiting: list[DeferredBatch], policy: RetryPolicy = RetryPolicy()):
    fn = RetryDeferredBatchesFn(HttpSinkSettings("https://api.example.com/v1/events", SOURCE, retry=policy))
    fn._client, fn._counters = ScriptedApi(answers), SinkCounters()
    bag, rounds, timer = FakeBag(waiting), FakeState([2]), FakeTimer()
    with ThreadPoolExecutor(max_workers=4) as fn._pool:
        dead = list(fn.retry_round(bag, rounds, timer))
    return fn._client.sent, bag.values, rounds.read(), timer.at, dead


def test_a_round_stops_at_its_oldest_batch_while_the_endpoint_is_still_down():
    waiting = [deferred_batch(2, age_seconds=5), deferred_batch(1, age_seconds=10)]
    sent, still, rounds, timer_at, dead = run_round({1: REFUSED, 2: OK}, waiting)

    assert sent == [1]  # the oldest only: one request per round while the endpoint is down
    assert sorted((d.batch.events[0][0], d.attempts) for d in still) == [(1, 2), (2, 1)]
    assert [d.last for d in still if d.batch.events[0][0] == 1] == [REFUSED]
    assert rounds == 3
    assert timer_at > time.time()
    assert dead == []


def test_once_the_oldest_gets_through_the_rest_are_sent_and_the_shard_is_clear():
    waiting = [deferred_batch(event_id, age_seconds=10 - event_id) for event_id in (1, 2, 3)]
    sent, still, rounds, timer_at, dead = run_round({1: OK, 2: OK, 3: OK}, waiting)

    assert sorted(sent) == [1, 2, 3]
    assert sent[0] == 1
    assert (still, rounds, timer_at, dead) == ([], None, None, [])


def test_a_batch_out_of_attempts_or_budget_becomes_dead_letters_with_the_last_answer():
    policy = RetryPolicy(max_attempts=3, max_retry_seconds=60)
    waiting = [deferred_batch(1, age_seconds=59.95, attempts=2), deferred_batch(2, age_seconds=59.9)]
    sent, still, rounds, _timer_at, dead = run_round({1: UNAVAILABLE}, waiting, policy)

    assert sent == [1]
    assert still == []
    assert rounds is None
    reasons = {letter.event_id: letter.reason for letter in dead}
    assert "gave up after 3 attempts" in reasons[1]
    assert "HTTP 503" in reasons[1]
    assert "would pass the 60s retry budget" in reasons[2]


def test_a_rejection_in_a_round_is_final():
    sent, still, rounds, _, dead = run_round(
        {1: Attempt(Verdict.REJECTED, status=400, detail="bad")}, [deferred_batch(1, age_seconds=1)]
    )
    assert (sent, still, rounds) == ([1], [], None)
    assert [letter.reason.split(" (Idempotency-Key")[0] for letter in dead] == [
        "HTTP API http://api.example.com/v1/events rejected: HTTP 400: bad"
    ]


def test_rounds_back_off_and_honour_retry_after():
    policy = RetryPolicy(initial_backoff_seconds=0.5, max_backoff_seconds=30, retry_after_cap_seconds=120)
    assert next_round_wait(policy, 1, None, lambda: 0.0) == 0.25  # never at once
    assert next_round_wait(policy, 4, None, lambda: 1.0) == 4.0
    assert next_round_wait(policy, 1, 7.0, lambda: 0.5) == 7.0
    assert next_round_wait(replace(policy, retry_after_cap_seconds=2), 1, 7.0, lambda: 0.5) == 2.0
