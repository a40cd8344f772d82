"""Instants as epoch microseconds: one exact conversion, shared by the hot paths that need it.

Pickling records, stamping event times for windowing and encoding BigQuery TIMESTAMPs each run once per
event. Integer arithmetic on a timedelta's parts is exact and about three times cheaper than Beam's
``Timestamp.from_utc_datetime`` or dividing timedeltas.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apache_beam.utils.timestamp import Timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_micros(value: datetime) -> int:
    """Microseconds since the epoch of an aware datetime, whatever its zone (a naive one raises TypeError)."""
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def beam_timestamp(value: datetime) -> Timestamp:
    """``Timestamp.from_utc_datetime(value.astimezone(UTC))`` for an aware datetime, at a third of its cost."""
    return Timestamp(micros=epoch_micros(value))


def utc_datetime(micros: int) -> datetime:
    """The instant ``micros`` after the epoch as an aware datetime in the standard library's UTC.

    What ``Timestamp(micros=micros).to_utc_datetime(has_tz=True)`` gives, except for the zone object: Beam's is
    pytz's UTC, which ``CompactPickleModel`` keeps as a whole datetime (it packs only the standard library's UTC
    into an integer), so every window state read unpickled a pytz zone."""
    return EPOCH + timedelta(microseconds=micros)
