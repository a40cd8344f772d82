"""Per-event engagement metrics, exactly as SPEC §3 defines them. Pure functions, no Beam."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, localcontext

_MILLIS_PER_SECOND = Decimal(1000)
_SECONDS_QUANTUM = Decimal("0.001")
_PCT_QUANTUM = Decimal("0.01")


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
    # Enough precision that the quotient is rounded once, by quantize, and never earlier.
    with localcontext() as ctx:
        ctx.prec = 50
        # ROUND_HALF_UP in the decimal module rounds half away from zero (0.125 -> 0.13).
        return (seconds / Decimal(length_seconds)).quantize(_PCT_QUANTUM, rounding=ROUND_HALF_UP)
