"""SPEC §3, row by row: engagement_seconds and engagement_pct."""

from decimal import Decimal

import pytest

from transforms.engagement import engagement_pct, engagement_seconds


@pytest.mark.parametrize(
    ("duration_ms", "expected"),
    [
        (1500, Decimal("1.500")),
        (1, Decimal("0.001")),
        (0, Decimal("0.000")),
        (999, Decimal("0.999")),
        (2_147_483_647, Decimal("2147483.647")),  # INTEGER's maximum stays exact
        (None, None),
        (-1, None),
        (-5000, None),
    ],
)
def test_engagement_seconds(duration_ms, expected):
    result = engagement_seconds(duration_ms)
    assert result == expected
    if expected is not None:
        # Exactly three places, whatever the value: 1.5 is written as 1.500.
        assert result.as_tuple().exponent == -3


@pytest.mark.parametrize(
    ("seconds", "length_seconds", "expected"),
    [
        (Decimal("15.000"), 60, Decimal("0.25")),  # a fraction, not a percentage
        (Decimal("0.125"), 1, Decimal("0.13")),  # half away from zero, not banker's rounding
        (Decimal("0.005"), 1, Decimal("0.01")),
        (Decimal("0.004"), 1, Decimal("0.00")),
        (Decimal("0.135"), 1, Decimal("0.14")),
        (Decimal("0.145"), 1, Decimal("0.15")),  # float arithmetic would give 0.14 here
        (Decimal("1.000"), 3, Decimal("0.33")),
        (Decimal("2.000"), 3, Decimal("0.67")),
        (Decimal("150.000"), 60, Decimal("2.50")),  # re-plays exceed 1: not capped
        (Decimal("0.000"), 60, Decimal("0.00")),
        (None, 60, None),
        (Decimal("1.000"), None, None),
        (Decimal("1.000"), 0, None),
        (Decimal("1.000"), -10, None),
    ],
)
def test_engagement_pct(seconds, length_seconds, expected):
    result = engagement_pct(seconds, length_seconds)
    assert result == expected
    if expected is not None:
        assert result.as_tuple().exponent == -2


def test_pct_rounds_once_from_the_exact_quotient():
    # 1.005 s of a 1 s item: 1.005 exactly, rounded half away from zero -> 1.01.
    # Rounding the seconds or the quotient twice (or in binary floating point) gives 1.00.
    assert engagement_pct(engagement_seconds(1005), 1) == Decimal("1.01")


def test_negative_duration_gives_no_pct_either():
    assert engagement_pct(engagement_seconds(-200), 60) is None
