"""The Redis sink on the DirectRunner against the stack's real Redis.

Rankings are relative to the wall clock, so windows are placed around the current minute, and far enough
from the horizon's edges that the minute turning during a test does not change what is ranked. Every test
writes under its own key prefix and deletes its keys afterwards.
"""

import io
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import apache_beam as beam
import pytest
import redis
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms.model import WindowAggregate
from transforms.secrets import SecretSource
from transforms.sinks import redis_top_cli
from transforms.sinks.redis_layout import RedisKeys, TopEntry, from_score, read_top_content
from transforms.sinks.redis_top import (
    RedisSinkSettings,
    RedisUrl,
    WriteTopContentFn,
    WriteTopContentToRedis,
    connect,
)

BUCKET_TTL = 900


@pytest.fixture
def prefix(stack):
    prefix = f"it-redis-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(stack.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def client(stack):
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    yield client
    client.close()


def current_minute() -> datetime:
    now = int(time.time())
    return datetime.fromtimestamp(now - now % 60, UTC)


def pane(content, start, seconds, events, pane_index=0, content_missing=False) -> WindowAggregate:
    content_id, title = content
    return WindowAggregate(
        window_start=start,
        window_end=start + timedelta(seconds=60),
        content_id=content_id,
        content_missing=content_missing,
        title=title,
        slug=title.lower().replace(" ", "-") if title else None,
        content_type="podcast" if title else None,
        event_count=events,
        play_count=events,
        pause_count=0,
        finish_count=0,
        click_count=0,
        engagement_seconds_sum=Decimal(seconds),
        distinct_users=events,
        pane_timing="EARLY" if pane_index == 0 else "ON_TIME",
        pane_index=pane_index,
        emitted_at=datetime.now(UTC),
    )


def run_sink(rows, config, check_dead_letters=None) -> dict[str, int]:
    """Runs the sink over ``rows``; returns its counters. ``check_dead_letters`` asserts on the dead letters."""
    pipeline = test_pipeline.TestPipeline()
    dead = pipeline | beam.Create(rows) | WriteTopContentToRedis(config)
    assert_that(dead, check_dead_letters or equal_to([]))
    result = pipeline.run()
    result.wait_until_finish()
    return {
        metric.key.metric.name: metric.committed
        for metric in result.metrics().query(MetricsFilter().with_namespace("sink.redis"))["counters"]
    }


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refired_and_replayed_panes_leave_exact_final_rankings(stack, prefix, client):
    # Small batches, so batches are flushed from process() as well as at the end of bundles.
    config = RedisSinkSettings(url=stack.redis_url, keys=RedisKeys(prefix), top_refresh_seconds=0, batch_size=2)
    keys = config.keys
    minute = current_minute()
    current, previous = minute, minute - timedelta(minutes=1)
    eight_ago = minute - timedelta(minutes=8)  # ranked even if the minute turns during the test
    eleven_ago = minute - timedelta(minutes=11)  # not ranked, but not expired either
    a, b, c = ((str(uuid.uuid4()), f"Redis IT {name} {prefix}") for name in "ABC")
    missing = (str(uuid.uuid4()), None)
    no_content = (None, None)

    early = [
        pane(a, current, "10.500", 2),
        pane(a, previous, "5.250", 1),
        pane(b, current, "12.000", 3),
        pane(c, eight_ago, "3.333", 1),
        pane(c, eleven_ago, "1000.000", 9),  # would make C first if the horizon were wrong
        pane(missing, current, "100000.000", 50, content_missing=True),
        pane(no_content, current, "99999.000", 40, content_missing=True),
    ]
    refired = [
        pane(a, current, "20.125", 4, pane_index=1),
        pane(a, current, "20.125", 4, pane_index=1),  # the same pane delivered twice
        pane(b, current, "15.500", 5, pane_index=1),
        pane(missing, current, "200000.000", 60, pane_index=1, content_missing=True),
    ]
    expected = [
        TopEntry(1, a[0], a[1], a[1].lower().replace(" ", "-"), "podcast", Decimal("25.375"), 5),
        TopEntry(2, b[0], b[1], b[1].lower().replace(" ", "-"), "podcast", Decimal("15.500"), 5),
        TopEntry(3, c[0], c[1], c[1].lower().replace(" ", "-"), "podcast", Decimal("3.333"), 1),
    ]

    counters = run_sink(early, config)
    assert counters["written"] == 5
    assert counters["skipped_unranked"] == 2
    assert [(e.content_id, e.engagement_seconds, e.event_count) for e in read_top_content(client, prefix)] == [
        (a[0], Decimal("15.750"), 3),
        (b[0], Decimal("12.000"), 3),
        (c[0], Decimal("3.333"), 1),
    ]

    # The re-fired panes overwrite, then a replay of every pane in order lands on the same values.
    # (An early pane replayed alone would briefly lower the value, as the pipeline's own panes would.)
    for replay in ([refired], [early, refired], [refired]):
        for rows in replay:
            run_sink(rows, config)
        assert read_top_content(client, prefix) == expected
        materialized = client.zrevrange(keys.top(10), 0, 9, withscores=True)
        assert [member for member, _ in materialized] == [a[0], b[0], c[0]]
        assert [score for _, score in materialized] == pytest.approx([25.375, 15.5, 3.333])
        assert dict(client.zrange(keys.top_events(10), 0, -1, withscores=True)) == {a[0]: 5, b[0]: 5, c[0]: 1}
    # The command as redis-cli users would type it reads the same buckets.
    assert client.zrange(keys.bucket(int(current.timestamp())), 0, -1, withscores=True) == [
        (b[0], 15.5),
        (a[0], 20.125),
    ]
    assert client.zscore(keys.bucket_events(int(current.timestamp())), a[0]) == 4
    assert client.hgetall(keys.content(a[0])) == {
        "title": a[1],
        "slug": a[1].lower().replace(" ", "-"),
        "content_type": "podcast",
    }
    assert client.hgetall(keys.meta()) == {"window_seconds": "60", "horizon_minutes": "10"}

    # Missing content is in no key at all.
    written = set(client.scan_iter(match=f"{prefix}:*", count=1000))
    assert not any(missing[0] in key for key in written)
    for key in written:
        if client.type(key) == "zset":
            assert missing[0] not in client.zrange(key, 0, -1)

    # Buckets expire at a fixed time after their window starts; the ranking shortly after its refresh.
    for start in (current, previous, eight_ago, eleven_ago):
        epoch = int(start.timestamp())
        assert client.expiretime(keys.bucket(epoch)) == epoch + BUCKET_TTL
        assert client.expiretime(keys.bucket_events(epoch)) == epoch + BUCKET_TTL
    assert 0 < client.ttl(keys.content(a[0])) <= BUCKET_TTL
    assert client.expiretime(keys.content(a[0])) >= int(current.timestamp()) + BUCKET_TTL
    assert 0 < client.ttl(keys.top(10)) <= config.top_ttl_seconds
    assert 0 < client.ttl(keys.top_events(10)) <= config.top_ttl_seconds

    out = io.StringIO()
    assert redis_top_cli.main(["--redis-url", stack.redis_url, "--prefix", prefix], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[2].split()[:3] == ["1", "25.375", "5"]
    assert a[1][:30] in lines[2]
    assert lines[4].split()[:3] == ["3", "3.333", "1"]
    assert len(lines) == 5


def test_unreachable_redis_sends_every_ranked_aggregate_to_the_dead_letters(prefix):
    config = RedisSinkSettings(
        url=f"redis://127.0.0.1:{closed_port()}/0", keys=RedisKeys(prefix), retry_seconds=1.0, batch_size=2
    )
    minute = current_minute()
    rows = [pane((str(uuid.uuid4()), f"Unreachable {index}"), minute, f"{index}.500", index) for index in range(1, 4)]
    rows.append(pane((None, None), minute, "1.000", 1, content_missing=True))
    expected_payloads = sorted(row.model_dump_json() for row in rows[:3])

    def check(letters):
        assert sorted(letter.payload_text for letter in letters) == expected_payloads
        for letter in letters:
            assert letter.stage.value == "redis"
            assert letter.source.kind == "aggregate"
            assert WindowAggregate.model_validate(json.loads(letter.payload_text)) in rows
        # The first batch retries for about a second; the next ones, right after, try once (Redis is known to
        # be down).
        attempts = sorted(int(letter.reason.split(" attempt(s)")[0].rsplit(" ", 1)[1]) for letter in letters)
        assert attempts[0] == 1
        assert attempts[-1] > 1
        assert all("ConnectionError" in letter.reason for letter in letters)

    started = time.monotonic()
    counters = run_sink(rows, config, check)
    assert counters["dead_lettered"] == 3
    assert counters["skipped_unranked"] == 1
    assert counters.get("written", 0) == 0
    # Retries for the first batch only, for its one second: an outage does not stall the pipeline.
    assert counters["retried"] >= 1
    assert time.monotonic() - started < 60


@pytest.fixture
def private_redis(tmp_path):
    """A Redis of this test's own, which it may kill and restart without touching the shared stack."""
    port = closed_port()
    argv = [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip

    def start() -> subprocess.Popen:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=port, socket_connect_timeout=0.2).ping():
                    return process
            except redis.ConnectionError:
                time.sleep(0.05)
        process.kill()
        pytest.fail("the private Redis did not start")

    servers = [start()]
    yield port, servers, start
    for server in servers:
        server.kill()
        server.wait()


def test_a_redis_restart_within_the_retry_time_loses_no_write(private_redis):
    """Issue 17: a 3-second Redis restart dead-lettered aggregates; a failover must be ridden out instead."""
    port, servers, start = private_redis
    config = RedisSinkSettings(url=f"redis://127.0.0.1:{port}/0", keys=RedisKeys("failover"), batch_size=2)
    assert config.retry_seconds >= 30
    minute = current_minute()
    rows = [pane((str(uuid.uuid4()), f"Failover {index}"), minute, f"{index}.250", index) for index in range(1, 6)]

    servers[0].kill()  # kill -9: down before the sink's first write
    servers[0].wait()
    restarter = threading.Timer(3.0, lambda: servers.append(start()))
    restarter.start()
    started = time.monotonic()
    counters = run_sink(rows, config)  # no dead letters (run_sink's default check)
    restarter.join()

    assert counters["written"] == 5
    assert counters.get("dead_lettered", 0) == 0
    assert counters["retried"] >= 1
    assert 3 <= time.monotonic() - started < 30
    restarted = redis.Redis(port=port, decode_responses=True)
    bucket = dict(restarted.zrange(config.keys.bucket(int(minute.timestamp())), 0, -1, withscores=True))
    assert {member: from_score(score) for member, score in bucket.items()} == {
        str(row.content_id): row.engagement_seconds_sum for row in rows
    }
    restarted.close()


def test_entries_an_outage_dead_lettered_are_rewritten_once_redis_answers_again(private_redis):
    """Issue 17: a window that gets no pane after an outage must not keep its stale entry until it expires."""
    port, servers, start = private_redis
    config = RedisSinkSettings(
        url=f"redis://127.0.0.1:{port}/0", keys=RedisKeys("repair"), retry_seconds=2, top_refresh_seconds=0
    )
    minute = current_minute()
    lost = [pane((str(uuid.uuid4()), f"Lost {index}"), minute, f"{index}.500", index) for index in range(1, 4)]
    later = pane((str(uuid.uuid4()), "After"), minute, "9.000", 9)
    sink = WriteTopContentFn(config)
    sink.setup()
    try:
        servers[0].kill()
        servers[0].wait()
        letters = run_bundle(sink, lost)
        assert len(letters) == len(lost)
        assert all(letter.value.value.reason.startswith("redis unreachable after") for letter in letters)

        servers.append(start())
        time.sleep(5.5)  # past the sink's degraded mode (one attempt per batch right after an outage)
        assert run_bundle(sink, [later]) == []
    finally:
        sink.teardown()
    restarted = redis.Redis(port=port, decode_responses=True)
    bucket = dict(restarted.zrange(config.keys.bucket(int(minute.timestamp())), 0, -1, withscores=True))
    restarted.close()
    assert {member: from_score(score) for member, score in bucket.items()} == {
        str(row.content_id): row.engagement_seconds_sum for row in [*lost, later]
    }


def run_bundle(sink: WriteTopContentFn, rows: list[WindowAggregate]) -> list:
    """One bundle through the DoFn by hand, so the test decides when each bundle runs; returns its outputs."""
    sink.start_bundle()
    window = GlobalWindow()
    outputs = [out for row in rows for out in sink.process(row, Timestamp.of(row.window_start.timestamp()), window)]
    return [*outputs, *(sink.finish_bundle() or [])]


def test_a_rejected_write_is_dead_lettered_without_retrying(stack, prefix, client):
    config = RedisSinkSettings(url=stack.redis_url, keys=RedisKeys(prefix))
    minute = current_minute()
    client.set(config.keys.bucket(int(minute.timestamp())), "not a sorted set")
    row = pane((str(uuid.uuid4()), "Wrong type"), minute, "2.000", 1)

    def check(letters):
        assert [letter.payload_text for letter in letters] == [row.model_dump_json()]
        assert letters[0].reason.startswith("redis rejected the write: ResponseError:")
        assert "WRONGTYPE" in letters[0].reason

    counters = run_sink([row], config, check)
    assert counters["dead_lettered"] == 1
    assert counters.get("retried", 0) == 0


def test_an_older_pane_arriving_late_does_not_overwrite_a_newer_one(stack, prefix, client):
    """Two bundles of writes can reach Redis out of order; the entry keeps the pane emitted last."""
    config = RedisSinkSettings(url=stack.redis_url, keys=RedisKeys(prefix), top_refresh_seconds=0)
    start = current_minute()
    content = (str(uuid.uuid4()), "Out of order")
    older = pane(content, start, "10.5", 3, pane_index=1)
    newer = pane(content, start, "42.25", 9, pane_index=2)
    assert older.emitted_at < newer.emitted_at

    run_sink([newer], config)
    run_sink([older], config)

    bucket = int(start.timestamp())
    assert from_score(client.zscore(config.keys.bucket(bucket), content[0])) == Decimal("42.250")
    assert client.zscore(config.keys.bucket_events(bucket), content[0]) == 9

    # A rewrite emitted later (a backfill) may lower the entry: newer wins, not larger.
    run_sink([pane(content, start, "7", 2, pane_index=0)], config)
    assert from_score(client.zscore(config.keys.bucket(bucket), content[0])) == Decimal("7.000")


def test_the_sink_authenticates_with_a_password_read_from_its_source_not_from_the_url(stack, prefix, client, tmp_path):
    # An ACL user of the stack's Redis stands for Memorystore's AUTH: the same AUTH command, a real refusal.
    user, password = f"sink-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~{prefix}:*", "+@all")
    try:
        password_file = tmp_path / "redis-password"
        password_file.write_text(password + "\n")
        host_and_port = stack.redis_url.removeprefix("redis://").split("/")[0]
        url = RedisUrl(f"redis://{user}@{host_and_port}/0", SecretSource(file_path=str(password_file)))
        authenticated = connect(url)
        try:
            authenticated.set(f"{prefix}:probe", "written")
        finally:
            authenticated.close()
        assert client.get(f"{prefix}:probe") == "written"
        assert password not in repr(url)

        password_file.write_text("not-the-password")
        refused = connect(url)
        try:
            with pytest.raises(redis.AuthenticationError) as error:
                refused.ping()
            assert "not-the-password" not in str(error.value)
        finally:
            refused.close()
    finally:
        client.execute_command("ACL", "DELUSER", user)
