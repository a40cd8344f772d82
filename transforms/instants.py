"""Instants as epoch microseconds: one exact conversion, shared by the hot paths that need it.

Pickling records, stamping event times for windowing and encoding BigQuery TIMESTAMPs each run once per
event. Integer arithmetic on a timedelta's parts is exact and about three times cheaper than Beam's
``Timestamp.from_utc_datetime`` or dividing timedeltas.
"""

from __future__ import annotations

from datetime import UTC, datetime

from apache_beam.utils.timestamp import Timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_micros(value: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, whatever its zone (a naive one raises TypeError)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def beam_timestamp(value: datetime) -> Timestamp:
    """``Timestamp.from_utc_datetime(value.astimezone(UTC))`` for an aware datetime, at a third of its cost."""
    return Timestamp(micros=epoch_micros(value))
