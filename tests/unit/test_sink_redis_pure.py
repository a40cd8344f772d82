"""The Redis sink's rules without Redis: key names, bucket selection, ranking, overwrites, expiry, options."""

import argparse
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.model import WindowAggregate
from transforms.sinks.redis_layout import (
    RankingSettings,
    RedisKeys,
    TopEntry,
    bucket_expires_at,
    content_expires_at,
    from_score,
    is_ranked,
    latest_panes,
    rank,
    to_score,
)
from transforms.sinks.redis_top import RedisSinkOptions, RedisSinkSettings, WriteTopContentToRedis, dead_letter
from transforms.sinks.redis_top_cli import build_parser, format_top

MINUTE = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
T0 = int(MINUTE.timestamp())
PODCAST = UUID("11111111-1111-4111-8111-111111111111")
VIDEO = UUID("22222222-2222-4222-8222-222222222222")


def aggregate(
    content_id=PODCAST,
    start=MINUTE,
    seconds="1.500",
    events=1,
    pane_index=0,
    content_missing=False,
    length=60,
    emitted_at=None,
) -> WindowAggregate:
    return WindowAggregate(
        window_start=start,
        window_end=start + timedelta(seconds=length),
        content_id=content_id,
        content_missing=content_missing,
        title=None if content_missing else "Deep Dive #42",
        slug=None if content_missing else "deep-dive-42",
        content_type=None if content_missing else "podcast",
        event_count=events,
        play_count=events,
        pause_count=0,
        finish_count=0,
        click_count=0,
        engagement_seconds_sum=Decimal(seconds),
        distinct_users=1,
        pane_timing="EARLY",
        pane_index=pane_index,
        emitted_at=emitted_at or start + timedelta(seconds=1 + pane_index),
    )


def test_key_names_are_readable_and_prefixed():
    keys = RedisKeys("engagement")
    assert keys.bucket(T0) == f"engagement:bucket:{T0}"
    assert keys.bucket_events(T0) == f"engagement:bucket:{T0}:events"
    assert keys.content(str(PODCAST)) == f"engagement:content:{PODCAST}"
    assert keys.top(10) == "engagement:top:10m"
    assert keys.top_events(10) == "engagement:top:10m:events"
    assert keys.meta() == "engagement:meta"
    assert RedisKeys("{tenant-a}").bucket(60) == "{tenant-a}:bucket:60"


@pytest.mark.parametrize("prefix", ["", "has space", "tab\there"])
def test_key_prefix_is_validated(prefix):
    with pytest.raises(ValueError, match="prefix"):
        RedisKeys(prefix)


def test_ranked_buckets_are_the_ten_most_recent_minutes_including_the_current_one():
    ranking = RankingSettings()
    starts = ranking.bucket_starts(T0 + 59.999)
    assert starts == [T0 - 60 * index for index in range(10)]
    # On the boundary, the new minute is current and the oldest one has left the ranking.
    assert ranking.bucket_starts(T0 + 60) == [T0 + 60 - 60 * index for index in range(10)]


@pytest.mark.parametrize(
    ("window_seconds", "horizon_minutes", "count"),
    [(60, 10, 10), (30, 10, 20), (120, 10, 5), (600, 10, 1), (1, 1, 60)],
)
def test_other_window_lengths_cover_the_same_horizon(window_seconds, horizon_minutes, count):
    ranking = RankingSettings(window_seconds=window_seconds, horizon_minutes=horizon_minutes)
    starts = ranking.bucket_starts(T0 + 7)
    assert len(starts) == count
    assert starts[0] <= T0 + 7 < starts[0] + window_seconds
    assert starts[0] - starts[-1] + window_seconds == horizon_minutes * 60


@pytest.mark.parametrize(
    ("window_seconds", "horizon_minutes", "message"),
    [(70, 10, "must divide"), (900, 10, "must divide"), (0, 10, "window_seconds"), (60, 0, "horizon")],
)
def test_windows_that_do_not_tile_the_horizon_are_rejected(window_seconds, horizon_minutes, message):
    with pytest.raises(ValueError, match=message):
        RankingSettings(window_seconds=window_seconds, horizon_minutes=horizon_minutes)


def test_missing_content_is_not_ranked():
    assert is_ranked(aggregate())
    assert not is_ranked(aggregate(content_missing=True))
    assert not is_ranked(aggregate(content_id=None, content_missing=True))


def test_the_newest_pane_wins_whatever_the_order_inside_a_batch():
    early = aggregate(seconds="1.000", events=1, pane_index=0)
    on_time = aggregate(seconds="9.250", events=4, pane_index=1)
    other_window = aggregate(start=MINUTE + timedelta(minutes=1), seconds="2.000", pane_index=0)
    video = aggregate(content_id=VIDEO, seconds="3.000")
    for order in ([early, on_time, other_window, video], [on_time, video, early, other_window, on_time]):
        latest = latest_panes(order)
        assert latest == {
            (T0, str(PODCAST)): on_time,
            (T0 + 60, str(PODCAST)): other_window,
            (T0, str(VIDEO)): video,
        }


def test_scores_round_trip_exactly_to_milliseconds():
    for text in ["0.000", "0.001", "12.345", "1234567.891", "0.1", "86399.999"]:
        assert from_score(to_score(Decimal(text))) == Decimal(text).quantize(Decimal("0.001"))
    # As redis-py returns them (float) and as redis-cli prints them (text).
    assert from_score(3.3000000000000003) == Decimal("3.300")
    assert from_score(b"12.345") == Decimal("12.345")


def test_ranking_orders_by_seconds_and_breaks_ties_like_zrevrange():
    totals = {"a": Decimal("5.000"), "c": Decimal("5.000"), "b": Decimal("7.500"), "d": Decimal("0.001")}
    assert rank(totals, 3) == [("b", Decimal("7.500")), ("c", Decimal("5.000")), ("a", Decimal("5.000"))]
    assert rank({}, 10) == []


def test_buckets_expire_relative_to_their_window_so_replays_set_the_same_expiry():
    assert bucket_expires_at(T0, 900) == T0 + 900
    # Content lives as long as the latest bucket naming it, and at least ttl from now.
    assert content_expires_at([T0 - 120, T0], now=T0 + 5.5, bucket_ttl_seconds=900) == T0 + 905
    assert content_expires_at([T0 + 600], now=T0, bucket_ttl_seconds=900) == T0 + 1500


def test_options_have_defaults_and_build_a_validated_config():
    options = PipelineOptions(["--redis_key_prefix=staging", "--redis_url=redis://:secret@cache:6379/2"])
    config = RedisSinkSettings.from_options(options, window_seconds=30)
    assert config.keys == RedisKeys("staging")
    assert config.ranking == RankingSettings(window_seconds=30, horizon_minutes=10)
    assert (config.bucket_ttl_seconds, config.top_ttl_seconds, config.batch_size, config.retry_seconds) == (
        900,
        60,
        500,
        30.0,
    )
    assert "secret" not in repr(config)
    with pytest.raises(ValueError, match="must divide"):
        RedisSinkSettings.from_options(options, window_seconds=45 * 60)
    with pytest.raises(ValueError, match="horizon"):
        RedisSinkSettings.from_options(PipelineOptions(["--redis_bucket_ttl_seconds=300"]), window_seconds=60)


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    RedisSinkOptions._add_argparse_args(parser)
    options = [action for action in parser._actions if action.dest != "help"]
    assert len(options) >= 4
    assert all(action.help and len(action.help) > 20 for action in options)


def test_dead_letter_carries_the_aggregate_as_json():
    row = aggregate(seconds="12.345", events=3)
    letter = dead_letter(row, "redis unreachable")
    assert letter.stage == "redis"
    assert letter.source.kind == "aggregate"
    assert WindowAggregate.model_validate_json(letter.payload_text) == row


def test_unranked_and_expired_rows_are_skipped_and_counted_without_touching_redis():
    # Port 1 is closed: the test would produce dead letters if the sink tried to write anything.
    config = RedisSinkSettings(url="redis://127.0.0.1:1/0", retry_seconds=0)
    rows = [
        aggregate(content_missing=True),
        aggregate(content_id=None, content_missing=True),
        aggregate(start=MINUTE - timedelta(days=1)),  # its bucket expired long ago
    ]
    pipeline = test_pipeline.TestPipeline()
    dead = pipeline | beam.Create(rows) | WriteTopContentToRedis(config)
    assert_that(dead, equal_to([]))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {
        metric.key.metric.name: metric.committed
        for metric in result.metrics().query(MetricsFilter().with_namespace("sink.redis"))["counters"]
    }
    assert counters.get("skipped_unranked") == 2
    assert counters.get("skipped_expired") == 1
    assert counters.get("written", 0) == 0


def test_windows_of_another_length_are_dead_lettered_not_mixed_into_the_ranking():
    config = RedisSinkSettings(url="redis://127.0.0.1:1/0", retry_seconds=0)
    row = aggregate(start=datetime.now(UTC).replace(microsecond=0), length=30)
    with test_pipeline.TestPipeline() as pipeline:
        dead = pipeline | beam.Create([row]) | WriteTopContentToRedis(config)
        assert_that(
            dead | beam.Map(lambda letter: (letter.stage.value, letter.reason)),
            equal_to([("redis", "window of 30 s, but the Redis sink ranks 60-second windows")]),
        )


def test_the_table_names_the_buckets_and_every_column():
    entries = [
        TopEntry(1, str(VIDEO), "Launch video", "launch-video", "video", Decimal("90.000"), 3),
        TopEntry(2, str(PODCAST), None, None, None, Decimal("1.500"), 1),
    ]
    text = format_top(entries, T0 + 30, RankingSettings(), "engagement")
    lines = text.splitlines()
    assert "10 buckets of 60 s, 09:51:00 to 10:01:00 UTC" in lines[0]
    assert lines[2].split() == ["1", "90.000", "3", "video", "Launch", "video", "launch-video"]
    assert lines[3].split() == ["2", "1.500", "1", "-", "-", "-"]
    assert "no ranked content" in format_top([], T0, RankingSettings(), "engagement")


def test_the_command_rejects_nonsense_arguments():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--watch", "soon"])
    assert build_parser().parse_args(["--watch", "2", "--prefix", "x"]).watch == 2.0


def test_freshness_is_measured_from_each_panes_oldest_new_commit():
    from transforms.sinks.redis_layout import freshness_samples

    panes = [
        aggregate().model_copy(update={"oldest_commit_ms": 1_000}),
        aggregate(content_id=VIDEO).model_copy(update={"oldest_commit_ms": 4_500}),
        aggregate(pane_index=1),  # no commit time (plain JSON or backfill): not measured
    ]
    assert freshness_samples(panes, written_at_ms=5_000) == [4_000, 500]


def test_the_live_view_reads_only_recent_freshness_samples():
    from transforms.sinks.redis_layout import read_freshness

    class Newest:
        def lrange(self, key, start, stop):
            assert key == "p:freshness"
            return [b"9000 120", b"8000 300", b"1000 9999"]  # newest first, as LPUSH leaves them

    assert read_freshness(Newest(), RedisKeys("p"), since_ms=5_000) == [120, 300]
