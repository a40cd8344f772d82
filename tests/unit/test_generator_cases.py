"""The generator's pure layer: every awkward kind produces what SPEC §2-3 says, reproducibly."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar
from uuid import UUID

import pytest

from devstack import generator
from devstack.generator import (
    CONTENT_TYPES,
    EVENT_TYPES,
    FUZZ_MAX_MESSAGE_BYTES,
    KAFKA_ONLY_KINDS,
    NO_DB_ID_BASE,
    POISON_KINDS,
    POISON_OUTCOMES,
    POISON_TOO_LARGE_BYTES,
    POSTGRES_KINDS,
    BatchPlanner,
    Catalogue,
    ContentFactory,
    CounterIds,
    Event,
    EventFactory,
    KafkaJsonEncoder,
    KafkaRecord,
    Kind,
    TokenBucket,
    _copy_text,
    _CopyBuffer,
    default_batch_size,
    ensure_special_content,
    format_event_ts,
    make_users,
    no_db_id_start,
    options_from_args,
    parse_mix,
    plan_kinds,
    resolve_duplicates,
)
from transforms.decode import DecodeError, decode_record

NOW = datetime(2026, 11, 22, 10, 0, 0, 123000, tzinfo=UTC)
MALFORMED_KINDS = [k for k in Kind if k.malformed]
EVENT_COLUMNS = {"id", "content_id", "user_id", "event_type", "event_ts", "duration_ms", "device", "raw_payload"}


def _planner(seed: int = 7, mode: str = "kafka-json", awkward: float = 0.0, content: int = 50) -> BatchPlanner:
    rng = random.Random(seed)
    factory = ContentFactory(rng)
    mix = parse_mix(mode, awkward)
    items = factory.catalogue(content, NOW)
    items += ensure_special_content(items, factory, mix, NOW)
    events = EventFactory(rng, Catalogue(items), make_users(rng, 100))
    return BatchPlanner(rng, factory, events, KafkaJsonEncoder(rng), mix)


def _event(kind: Kind, seed: int = 3) -> tuple[Event, Catalogue]:
    planner = _planner(seed, awkward=1.0)
    fresh = planner.content_factory.fresh(NOW) if kind is Kind.FRESH_CONTENT else None
    return planner.events.build(kind, NOW, fresh), planner.events.catalogue


def _encoded(kind: Kind, seeds: int, first_id: int) -> Iterator[tuple[int, KafkaRecord]]:
    """(seed, record) of one event of ``kind`` per seed, event ``first_id + seed``, through one encoder."""
    encoder = KafkaJsonEncoder(random.Random(0))
    for seed in range(seeds):
        record = encoder.encode(_event(kind, seed)[0], first_id + seed)
        assert record.kind is kind
        yield seed, record


def _json(record_value: bytes) -> dict:
    return json.loads(record_value)


# --- determinism ------------------------------------------------------------------------------------------


def test_same_seed_same_rows_and_records() -> None:
    def run(seed: int) -> tuple[list[Event], list[bytes]]:
        planner = _planner(seed, awkward=0.5)
        plans = [planner.plan(200, NOW + timedelta(seconds=i)) for i in range(3)]
        ids = CounterIds(1)
        records = [r.value for p in plans for r in planner.kafka_records(p, ids.take(len(p.events)))]
        return [e for p in plans for e in p.events], records

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_catalogue_has_realistic_spread_and_unique_slugs() -> None:
    items = ContentFactory(random.Random(1)).catalogue(2000, NOW)
    assert len({c.slug for c in items}) == len(items)
    assert len({c.id for c in items}) == len(items)
    assert {c.content_type for c in items} == {*CONTENT_TYPES, None}
    assert any(c.length_seconds is None for c in items)
    lengths = [c.length_seconds for c in items if c.length_seconds is not None]
    assert min(lengths) > 0
    assert all(c.publish_ts <= NOW for c in items)


def test_normal_events_are_clean() -> None:
    planner = _planner()
    plan = planner.plan(2000, NOW)
    known = {c.id for c in planner.events.catalogue.items}
    assert all(e.kind is Kind.NORMAL for e in plan.events)
    for e in plan.events:
        assert e.content_id in known
        assert e.user_id is not None
        assert e.device is not None
        assert e.raw_payload is not None
        assert e.event_type in EVENT_TYPES
        assert NOW - timedelta(seconds=1) <= e.event_ts <= NOW
        # Clicks have no duration by nature (SPEC §1); everything else has a positive one.
        assert (e.duration_ms is None) == (e.event_type == "click")
        assert e.duration_ms is None or e.duration_ms > 0
    assert {e.event_type for e in plan.events} == set(EVENT_TYPES)


# --- the mix ----------------------------------------------------------------------------------------------


def test_mix_spreads_the_fraction_over_the_modes_kinds() -> None:
    mix = parse_mix("postgres", 0.24)
    assert set(mix) == set(POSTGRES_KINDS)
    assert sum(mix.values()) == pytest.approx(0.24)
    assert set(parse_mix("kafka-json", 0.1)) == set(POSTGRES_KINDS + KAFKA_ONLY_KINDS)


def test_mix_refuses_kafka_only_kinds_in_postgres_mode_and_shares_above_one() -> None:
    with pytest.raises(ValueError, match="not possible in postgres"):
        parse_mix("postgres", explicit={Kind.DUPLICATE: 0.1})
    with pytest.raises(ValueError, match="more than every record"):
        parse_mix("kafka-json", 0.9, explicit={Kind.LATE: 0.2})


def test_planned_shares_follow_the_mix() -> None:
    kinds = plan_kinds(random.Random(5), 20_000, {Kind.LATE: 0.1, Kind.NULL_USER_ID: 0.05})
    assert kinds.count(Kind.LATE) / len(kinds) == pytest.approx(0.1, abs=0.01)
    assert kinds.count(Kind.NULL_USER_ID) / len(kinds) == pytest.approx(0.05, abs=0.01)
    assert plan_kinds(random.Random(5), 10, {}) == [Kind.NORMAL] * 10


def test_cli_flags_build_the_mix() -> None:
    opts = options_from_args(
        ["kafka-json", "--awkward", "0.2", "--awkward-kinds", "late,duplicate", "--case", "null_device=0.05"]
    )
    assert opts is not None
    assert opts.mix == pytest.approx({Kind.LATE: 0.1, Kind.DUPLICATE: 0.1, Kind.NULL_DEVICE: 0.05})
    with pytest.raises(SystemExit):
        options_from_args(["postgres", "--case", "malformed_non_json=0.1"])


# --- each awkward kind ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "column"),
    [
        (Kind.NULL_USER_ID, "user_id"),
        (Kind.NULL_DEVICE, "device"),
        (Kind.NULL_RAW_PAYLOAD, "raw_payload"),
        (Kind.NULL_EVENT_TYPE, "event_type"),
        (Kind.NULL_DURATION, "duration_ms"),
        (Kind.NULL_CONTENT_ID, "content_id"),
    ],
)
def test_null_kinds_null_exactly_their_column(kind: Kind, column: str) -> None:
    for seed in range(20):
        event, _ = _event(kind, seed)
        assert getattr(event, column) is None
        others = {"user_id", "device", "raw_payload", "event_type", "content_id"} - {column}
        assert all(getattr(event, c) is not None for c in others)


def test_null_duration_is_on_an_event_type_that_normally_has_one() -> None:
    for seed in range(30):
        event, _ = _event(Kind.NULL_DURATION, seed)
        assert event.event_type in ("play", "pause", "finish")


def test_negative_duration() -> None:
    for seed in range(30):
        event, _ = _event(Kind.NEGATIVE_DURATION, seed)
        assert event.duration_ms is not None
        assert event.duration_ms < 0


@pytest.mark.parametrize(("kind", "length"), [(Kind.ZERO_LENGTH_CONTENT, 0), (Kind.NULL_LENGTH_CONTENT, None)])
def test_special_length_content(kind: Kind, length: int | None) -> None:
    event, catalogue = _event(kind)
    content = {c.id: c for c in catalogue.items}[event.content_id]
    assert content.length_seconds == length
    assert event.duration_ms is None or event.duration_ms > 0 or event.event_type == "click"


def test_special_content_is_created_only_when_needed() -> None:
    factory = ContentFactory(random.Random(1))
    mix = parse_mix("postgres", 0.5)
    needed = ensure_special_content([], factory, mix, NOW)
    assert sorted(str(c.length_seconds) for c in needed) == ["0", "None"]
    assert ensure_special_content(needed, factory, mix, NOW) == []
    assert ensure_special_content([], factory, {Kind.LATE: 0.1}, NOW) == []


def test_late_and_out_of_order_timestamps() -> None:
    for seed in range(20):
        late, _ = _event(Kind.LATE, seed)
        assert timedelta(minutes=2) <= NOW - late.event_ts <= timedelta(minutes=15)
        ooo, _ = _event(Kind.OUT_OF_ORDER, seed)
        assert timedelta(seconds=5) <= NOW - ooo.event_ts <= timedelta(seconds=50)


def test_fresh_content_is_new_and_referenced_by_the_batch() -> None:
    planner = _planner(awkward=0.0)
    planner.mix = {Kind.FRESH_CONTENT: 0.2}
    plan = planner.plan(100, NOW)
    assert plan.fresh_content is not None
    assert plan.fresh_content.id not in {c.id for c in planner.events.catalogue.items}
    fresh_events = [e for e in plan.events if e.kind is Kind.FRESH_CONTENT]
    assert fresh_events
    assert all(e.content_id == plan.fresh_content.id for e in fresh_events)
    assert all(e.event_ts >= plan.fresh_content.publish_ts for e in fresh_events)
    planner.mix = {}
    assert planner.plan(50, NOW).fresh_content is None


def test_unknown_content_is_not_in_the_catalogue() -> None:
    event, catalogue = _event(Kind.UNKNOWN_CONTENT)
    assert event.content_id is not None
    UUID(event.content_id)
    assert event.content_id not in {c.id for c in catalogue.items}


# --- Kafka records ----------------------------------------------------------------------------------------


def test_valid_records_follow_spec_and_decode() -> None:
    planner = _planner(awkward=0.0)
    plan = planner.plan(400, NOW)
    records = planner.kafka_records(plan, CounterIds(1000).take(len(plan.events)))
    formats = set()
    for record, event in zip(records, plan.events, strict=True):
        obj = _json(record.value)
        assert record.key == str(obj["id"]).encode()
        assert set(obj) == EVENT_COLUMNS
        formats.add(type(obj["event_ts"]).__name__ if isinstance(obj["event_ts"], int) else obj["event_ts"][-1])
        decoded = decode_record(record.value).event
        assert decoded is not None
        assert decoded.id == record.event_id
        assert decoded.event_ts == event.event_ts
        assert decoded.duration_ms == event.duration_ms
    # Epoch millis, "Z", "+00:00" and other offsets all appear.
    assert "int" in formats
    assert "Z" in formats
    assert len(formats) >= 3


def test_event_ts_formats_denote_the_same_instant() -> None:
    rng = random.Random(2)
    for _ in range(50):
        value = format_event_ts(NOW, rng)
        parsed = datetime.fromtimestamp(value / 1000, UTC) if isinstance(value, int) else datetime.fromisoformat(value)
        assert parsed == NOW


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_malformed_records_are_really_malformed(kind: Kind) -> None:
    for seed, record in _encoded(kind, seeds=25, first_id=5000):
        with pytest.raises(DecodeError):
            decode_record(record.value)
        if kind is Kind.MALFORMED_NON_JSON:
            with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
                json.loads(record.value)
        if kind is Kind.MALFORMED_MISSING_ID:
            assert _json(record.value).get("id") is None
            assert record.event_id is None
        if kind is Kind.MALFORMED_MISSING_EVENT_TS:
            assert _json(record.value).get("event_ts") is None
            assert record.event_id == 5000 + seed
        if kind is Kind.MALFORMED_BAD_EVENT_TYPE:
            assert _json(record.value)["event_type"] not in EVENT_TYPES
        if kind is Kind.MALFORMED_INVALID_UUID:
            obj = _json(record.value)
            bad = [f for f in ("content_id", "user_id") if obj[f] is not None and not _is_uuid(obj[f])]
            assert bad
        if kind is Kind.MALFORMED_NOT_OBJECT:
            assert not isinstance(_json(record.value), dict)


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


def test_malformed_records_never_become_duplicates() -> None:
    encoder = KafkaJsonEncoder(random.Random(0))
    event, _ = _event(Kind.MALFORMED_WRONG_TYPE)
    encoder.encode(event, 1)
    assert not encoder.has_history
    with pytest.raises(ValueError, match="nothing has been sent"):
        encoder.duplicate()


def test_duplicates_repeat_earlier_records_byte_for_byte() -> None:
    planner = _planner(awkward=0.0)
    planner.mix = {Kind.DUPLICATE: 0.3}
    ids = CounterIds(1)
    sent: dict[int, bytes] = {}
    duplicates = 0
    for i in range(5):
        plan = planner.plan(200, NOW + timedelta(seconds=i))
        for record in planner.kafka_records(plan, ids.take(len(plan.events))):
            assert record.event_id is not None
            if record.kind is Kind.DUPLICATE:
                duplicates += 1
                assert sent[record.event_id] == record.value
                assert record.key == str(record.event_id).encode()
            else:
                assert record.event_id not in sent  # every original id is new
                sent[record.event_id] = record.value
    assert duplicates > 200


def test_leading_duplicates_without_history_become_normal() -> None:
    kinds = [Kind.DUPLICATE, Kind.MALFORMED_NON_JSON, Kind.DUPLICATE, Kind.LATE, Kind.DUPLICATE]
    assert resolve_duplicates(kinds, has_history=False) == [
        Kind.NORMAL,
        Kind.MALFORMED_NON_JSON,
        Kind.DUPLICATE,
        Kind.LATE,
        Kind.DUPLICATE,
    ]
    assert resolve_duplicates(kinds, has_history=True) == kinds


def test_kafka_records_need_one_id_per_built_event() -> None:
    planner = _planner()
    plan = planner.plan(10, NOW)
    with pytest.raises(ValueError, match="need as many ids"):
        planner.kafka_records(plan, [1, 2])


# --- ids, pacing, COPY ------------------------------------------------------------------------------------


def test_no_db_ids_are_above_any_sequence_and_exact_as_doubles() -> None:
    start = no_db_id_start(now=1_795_000_000.0)
    assert start > NO_DB_ID_BASE > 10**15
    assert start + 10**9 < 2**53
    assert no_db_id_start(now=1_795_000_001.0) - start == 1_000_000
    assert CounterIds(5).take(3) == [5, 6, 7]


def test_token_bucket_paces_to_the_rate() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    bucket = TokenBucket(1000, 1000, clock=lambda: clock[0], sleep=sleep)
    for _ in range(50):
        bucket.acquire(100)
    assert clock[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="cannot take"):
        bucket.acquire(1001)


def test_token_bucket_catches_up_at_most_its_capacity() -> None:
    clock = [0.0]
    bucket = TokenBucket(100, 50, clock=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    clock[0] = 10.0  # a long stall: only 50 tokens may have accrued
    bucket.acquire(50)
    assert clock[0] == 10.0
    bucket.acquire(50)
    assert clock[0] == pytest.approx(10.5)


def test_default_batch_size_gives_about_ten_transactions_a_second() -> None:
    assert default_batch_size(10_000) == 1000
    assert default_batch_size(5) == 1
    assert default_batch_size(1_000_000) == 2000


def test_copy_text_escapes_what_copy_would_misread() -> None:
    assert _copy_text(None) == "\\N"
    assert _copy_text('{"a":"x\\ty\\n"}') == '{"a":"x\\\\ty\\\\n"}'
    assert _copy_text("tab\there") == "tab\\there"
    buf = _CopyBuffer([(1, None, NOW)])
    assert buf.read() == f"1\t\\N\t{NOW.isoformat()}\n".encode()
    assert buf.read() == b""


# --- the run loop, with a fake Kafka and no database ------------------------------------------------------


class _FakeKafka:
    sent: ClassVar[list[KafkaRecord]] = []

    def __init__(self, bootstrap: str, topic: str, partitions: int, max_message_bytes: int | None = None) -> None:
        self.topic = topic
        self.max_message_bytes = max_message_bytes

    def send(self, records: list[KafkaRecord]) -> float:
        self.sent.extend(records)
        return 1_800_000_000.0

    def close(self) -> None:
        pass


def test_kafka_json_run_loop_without_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(generator, "KafkaJsonSink", _FakeKafka)
    _FakeKafka.sent = []
    argv = "kafka-json --no-db --rate 0 --count 1500 --batch-size 100 --seed 3 --awkward 0.4 --content 20 --quiet"
    opts = options_from_args(
        [*argv.split(), "--manifest", str(tmp_path / "m.jsonl"), "--commit-log", str(tmp_path / "c.jsonl")]
    )
    assert opts is not None
    assert Kind.FRESH_CONTENT not in opts.mix  # nothing to create content in
    summary = generator.run(opts, log=io.StringIO())

    assert summary.records == len(_FakeKafka.sent) == 1500
    events = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    events = [e for e in events if e["type"] == "event"]
    assert [e["kind"] for e in events] == [r.kind.value for r in _FakeKafka.sent]
    assert all(e["id"] is None or e["id"] > NO_DB_ID_BASE for e in events)
    assert sum(summary.kinds.values()) == 1500
    assert summary.kinds["duplicate"] > 0
    commits = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(commits) == 15
    assert sum(c["count"] for c in commits) == 1500


def test_no_db_refuses_fresh_content_and_postgres_mode() -> None:
    with pytest.raises(SystemExit):
        options_from_args(["kafka-json", "--no-db", "--case", "fresh_content=0.1"])
    with pytest.raises(SystemExit):
        options_from_args(["postgres", "--no-db"])


# --- fuzz mode: the poison records of issue 16 ------------------------------------------------------------------

POISON_REASONS = {
    Kind.POISON_DEEP_NESTING: "too deeply nested",
    Kind.POISON_RANDOM_BYTES: "not UTF-8",
    Kind.POISON_TRUNCATED_DEBEZIUM: "not JSON",
    Kind.POISON_TOO_LARGE: "too large",
    Kind.POISON_ID_STRING: "id: Input should be a valid integer",
    Kind.POISON_INVALID_UTF8: "not UTF-8",
    Kind.POISON_OUT_OF_RANGE: "out of range",
    Kind.POISON_JSON_ARRAY: "unknown shape",
}


@pytest.mark.parametrize("kind", POISON_KINDS)
def test_each_poison_record_becomes_what_the_pipeline_promises(kind: Kind) -> None:
    for seed, record in _encoded(kind, seeds=5, first_id=7000):
        outcome = POISON_OUTCOMES[kind]
        if outcome == "dead_letter":
            with pytest.raises(DecodeError, match=POISON_REASONS[kind]):
                decode_record(record.value)
            assert record.event_id is None
        else:
            decoded = decode_record(record.value)
            assert (decoded.skip is not None) == (outcome == "skip")
            assert record.event_id == (7000 + seed if outcome == "event" else None)
            assert (record.key is None) == (kind is Kind.POISON_NULL_KEY)


def test_the_poison_records_are_as_large_and_deep_as_the_report_says() -> None:
    encoder = KafkaJsonEncoder(random.Random(0))
    too_large = encoder.encode(_event(Kind.POISON_TOO_LARGE)[0], 1).value
    deep = encoder.encode(_event(Kind.POISON_DEEP_NESTING)[0], 1).value
    assert POISON_TOO_LARGE_BYTES < len(too_large) < FUZZ_MAX_MESSAGE_BYTES
    assert deep.count(b"{") == 1_000
    assert encoder.encode(_event(Kind.POISON_NULL_VALUE)[0], 1).value is None


def test_fuzz_mode_sends_poison_only_and_a_tenth_of_it_by_default() -> None:
    opts = options_from_args(["fuzz", "--no-db"])
    assert set(opts.mix) == set(POISON_KINDS)
    assert sum(opts.mix.values()) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="not possible in fuzz mode"):
        parse_mix("fuzz", explicit={Kind.DUPLICATE: 0.1})
    assert not set(parse_mix("kafka-json", 1.0)) & set(POISON_KINDS)
