"""The audit's pure parts (devstack/audit.py): what counts as lost, doubled or wrong."""

from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal

from devstack.audit import (
    Audit,
    SinkAudit,
    comparable,
    copies_audit,
    diff,
    differences,
    ranked_buckets,
    receipt_counts,
)

WINDOW = datetime(2026, 12, 5, 9, 0, 0, tzinfo=UTC)


def truth_row(events: int, seconds: str) -> dict:
    return {
        "event_count": events,
        "play_count": events,
        "pause_count": 0,
        "finish_count": 0,
        "click_count": 0,
        "distinct_users": 1,
        "engagement_seconds_sum": Decimal(seconds),
    }


def test_copies_count_missing_and_repeated_ids_apart():
    assert copies_audit(Counter({1: 1, 2: 0, 3: 2, 4: 5})) == SinkAudit(lost=1, doubled=2)
    assert copies_audit(Counter({1: 1})).exact


def test_receipts_of_the_stand_in_api():
    stored = {"ids": [1, 2, 9], "duplicates": [{"id": 2, "count": 3}, {"id": 8, "count": 2}]}
    assert receipt_counts(stored, [1, 2, 3]) == {1: 1, 2: 3, 3: 0}


def test_windows_are_compared_per_content_and_rank_only_known_content():
    truth = {
        (WINDOW, "a", False): truth_row(2, "3.5"),
        (WINDOW, None, True): truth_row(1, "1"),
        (WINDOW, "gone", True): truth_row(1, "2"),
    }
    assert set(comparable(truth)) == {(WINDOW, "a", False), (WINDOW, "gone", True)}
    assert ranked_buckets(truth) == {(int(WINDOW.timestamp()), "a"): (Decimal("3.500"), 2)}
    expected = comparable(truth)
    actual = {**expected, (WINDOW, "a", False): (1, 1, 0, 0, 0, 1, Decimal("1.000"))}
    assert differences(actual, expected) == 1
    assert differences({}, expected) == 2
    assert "actual (1, 1, 0, 0, 0, 1" in diff(actual, expected)
    assert diff(expected, expected) == ""


def test_an_audit_is_exact_only_when_every_sink_is():
    exact = SinkAudit()
    assert Audit(exact, exact, exact, exact, dead_letters=3).exact  # dead letters are reported, not judged
    assert not Audit(exact, SinkAudit(doubled=1), exact, exact, dead_letters=0).exact
