"""The HTTP sink's delivery ledger: which event ids the external API has acknowledged, kept in Redis.

The API is idempotent per batch (``Idempotency-Key``), but a restarted job re-reads an overlap of Kafka and
forms *different* batches, whose keys the API has never seen. The ledger lets the restart skip events the
API already has (transforms/resume.py). It is written after each acknowledged batch and read once per
worker when a job resumes.

Layout: one Redis string per minute of delivery time, ``<prefix>:http:delivered:<epoch minute start>``,
holding the ids as packed big-endian int64 values appended batch by batch (8 bytes per event: at 5,000
events/s an hour is about 140 MB, where a Redis set would take about ten times that). Each key expires
``ttl_seconds`` after its minute, so the ledger covers restarts up to that long after a stop.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

_ID = struct.Struct(">q")
_MINUTE = 60


@dataclass(frozen=True)
class DeliveryLedger:
    prefix: str
    ttl_seconds: int = 3600

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0:
            raise ValueError("the delivery ledger's TTL must be positive")

    def key(self, minute_start: int) -> str:
        return f"{self.prefix}:http:delivered:{minute_start}"

    def record(self, client, event_ids: Iterable[int], now: float) -> None:  # noqa: ANN001 - redis.Redis
        """Appends ids acknowledged at ``now`` (epoch seconds); one round trip."""
        minute = int(now // _MINUTE) * _MINUTE
        packed = b"".join(_ID.pack(event_id) for event_id in event_ids)
        pipe = client.pipeline(transaction=False)
        pipe.append(self.key(minute), packed)
        pipe.expireat(self.key(minute), minute + _MINUTE + self.ttl_seconds)
        pipe.execute()

    def load_since(self, client, since: datetime, now: datetime) -> frozenset[int]:  # noqa: ANN001 - redis.Redis
        """Every id acknowledged from ``since``'s minute up to ``now``'s."""
        first = int(since.timestamp() // _MINUTE) * _MINUTE
        last = int(now.timestamp() // _MINUTE) * _MINUTE
        keys = [self.key(minute) for minute in range(first, last + _MINUTE, _MINUTE)]
        ids: set[int] = set()
        for start in range(0, len(keys), 100):
            for blob in client.mget(keys[start : start + 100]):
                if blob:
                    ids.update(value for (value,) in _ID.iter_unpack(blob))
        return frozenset(ids)
