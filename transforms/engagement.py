"""Per-event engagement metrics, exactly as SPEC §3 defines them. Pure functions, no Beam."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal

_MILLIS_PER_SECOND = Decimal(1000)
_SECONDS_QUANTUM = Decimal("0.001")
_PCT_QUANTUM = Decimal("0.01")
_PCT_CONTEXT = Context(prec=50, rounding=ROUND_HALF_UP)
"""Enough precision that the quotient is rounded once, by quantize, and never earlier; ROUND_HALF_UP in the
decimal module rounds half away from zero (0.125 -> 0.13)."""


def engagement_seconds(duration_ms: int | None) -> Decimal | None:
    """``duration_ms / 1000`` as an exact 3-place decimal; NULL for a NULL or negative duration."""
    if duration_ms is None or duration_ms < 0:
        return None
    # An int divided by 1000 is exact in decimal; quantize only fixes the scale to 3 places.
    return (Decimal(duration_ms) / _MILLIS_PER_SECOND).quantize(_SECONDS_QUANTUM)


def engagement_pct(seconds: Decimal | None, length_seconds: int | None) -> Decimal | None:
    """``seconds / length_seconds`` as a fraction, rounded to 2 places half away from zero.

    NULL when either side is NULL or the length is not positive; not capped, since re-plays exceed 1.
    """
    if seconds is None or length_seconds is None or length_seconds <= 0:
        return None
    # The context is passed to each operation rather than entered: ``localcontext()`` copies the thread's
    # context on every call, which was a tenth of the backfill's CPU (docs/benchmarks.md, backfill session 19).
    quotient = _PCT_CONTEXT.divide(seconds, Decimal(length_seconds))
    return quotient.quantize(_PCT_QUANTUM, context=_PCT_CONTEXT)
