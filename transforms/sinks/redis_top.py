"""Redis sink: "top content in the last 10 minutes" (SPEC §5), written from accumulating window aggregates.

Each fired pane carries its window's whole value so far, so the sink *overwrites* one entry per
(window, content) in a per-window bucket and never increments: a re-fired pane, a retried write or a
replay leaves the same value. Rankings are unions of the most recent buckets, computed by the reader
(``redis_layout.read_top_content``, exact, in decimal) and materialized for ``redis-cli``
(``<prefix>:top:10m``). The keys and entries are ``redis_layout``'s; their types and TTLs are documented in
docs/redis.md. This module holds the options and settings and the writing; the connection is ``redis_client``'s.

Rows of unknown content (``content_missing``) are excluded from rankings (SPEC §3) and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import apache_beam as beam
import redis
import tenacity
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import BoundedWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from transforms.dead_letters import DEAD_LETTER_TAG, RejectCounter
from transforms.model import DeadLetter, SourceCoordinates, Stage, WindowAggregate
from transforms.retry import Backoff, retrying
from transforms.secrets import password_source_from
from transforms.settings import add_options, option_values, setting
from transforms.sinks.redis_client import TRANSIENT_ERRORS, RedisUrl, connect
from transforms.sinks.redis_layout import (
    FRESHNESS_SAMPLES,
    OVERWRITE_IF_NEWER,
    RankingSettings,
    RedisKeys,
    bucket_entry,
    bucket_expires_at,
    bucket_start,
    content_expires_at,
    freshness_samples,
    is_ranked,
    latest_panes,
    window_length,
)

METRICS_NAMESPACE = "sink.redis"

_RETRY_BACKOFF = Backoff(initial_seconds=0.1, max_seconds=2.0)
_DEGRADED_SECONDS = 5.0
DEFAULT_RETRY_SECONDS = 30.0
"""A managed Redis failover (Memorystore, ElastiCache) takes 10-30 s; a batch rides it out before a dead letter."""

# A window aggregate has no Kafka or PostgreSQL position of its own.
AGGREGATE_SOURCE = SourceCoordinates(kind="aggregate")

_log = logging.getLogger(__name__)


# --- Configuration -----------------------------------------------------------------------------------


class RedisSinkOptions(PipelineOptions):
    """Options of the Redis "top content" sink."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # noqa: ANN001 - Beam's argparse wrapper
        parser.add_argument(
            "--redis_url",
            default="redis://127.0.0.1:26379/0",
            help=(
                "Redis to write the top-content buckets to, as a redis:// or rediss:// URL. A password in the "
                "URL is never logged, but travels in the job graph: on Dataflow give it as "
                "--redis_password_secret instead. The default is the local stack's Redis."
            ),
        )
        add_options(parser, RedisKeys, RankingSettings, RedisSinkSettings)
        parser.add_argument(
            "--redis_password_secret",
            help=(
                "Secret Manager secret version holding the Redis AUTH password (Memorystore's AUTH string), "
                "projects/PROJECT/secrets/NAME/versions/VERSION, read by each worker when it connects. "
                "--redis_url then holds no password."
            ),
        )
        parser.add_argument(
            "--redis_password_file",
            help="File holding the Redis AUTH password, read when connecting (local runs; not on Dataflow).",
        )


def redis_url_from_options(options: PipelineOptions) -> RedisUrl:
    """The Redis URL, its password kept out of the graph (``password_source_from``)."""
    sink = options.view_as(RedisSinkOptions)
    password = password_source_from(
        options,
        what="the Redis password",
        target_option="--redis_url",
        target_has_password=bool(urlsplit(sink.redis_url).password),
        secret_option="--redis_password_secret",  # noqa: S106 - an option name
        secret=sink.redis_password_secret,
        file_option="--redis_password_file",
        file_path=sink.redis_password_file,
    )
    return RedisUrl(sink.redis_url, password)


@dataclass(frozen=True, repr=False)
class RedisSinkSettings:
    """The sink's validated settings; built from ``RedisSinkOptions`` and the pipeline's window length."""

    url: str | RedisUrl
    keys: RedisKeys = field(default_factory=RedisKeys)
    ranking: RankingSettings = field(default_factory=RankingSettings)
    bucket_ttl_seconds: int = setting(
        900,
        flag="--redis_bucket_ttl_seconds",
        type=int,
        help=(
            "How long after its window starts a bucket (and the content metadata it names) is kept, in "
            "seconds. At least the ranking horizon; the default leaves 5 minutes beyond it for readers "
            "and clock skew. Panes for windows older than this are not written (and are counted)."
        ),
    )
    top_ttl_seconds: int = setting(
        60,
        flag="--redis_top_ttl_seconds",
        type=int,
        help=(
            "TTL of the materialized ranking keys (<prefix>:top:<N>m and :events), in seconds: a stopped "
            "pipeline's ranking disappears instead of going silently stale."
        ),
    )
    top_refresh_seconds: float = setting(
        1.0,
        flag="--redis_top_refresh_seconds",
        type=float,
        help=(
            "Least time between two recomputations of the materialized ranking by one worker, in seconds "
            "(0 recomputes after every write). Buckets are written at once either way."
        ),
    )
    batch_size: int = setting(
        500,
        flag="--redis_batch_size",
        type=int,
        help="Most window aggregates sent in one Redis pipeline; a bundle's remainder is sent when it ends.",
    )
    retry_seconds: float = setting(
        DEFAULT_RETRY_SECONDS,
        flag="--redis_retry_seconds",
        type=float,
        help=(
            "How long a batch is retried while Redis is unreachable or times out, in seconds, with "
            "exponential backoff and jitter (a managed Redis failover takes 10-30 s); then its aggregates "
            "go to the dead letters. 0: one attempt."
        ),
    )
    connect_timeout_seconds: float = 2.0
    socket_timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.bucket_ttl_seconds < self.ranking.horizon_seconds:
            raise ValueError(
                f"redis_bucket_ttl_seconds ({self.bucket_ttl_seconds}) must be at least the ranking horizon "
                f"({self.ranking.horizon_seconds} s), or buckets would expire while still ranked"
            )
        if self.top_ttl_seconds <= 0:
            raise ValueError("redis_top_ttl_seconds must be positive")
        if self.top_refresh_seconds < 0:
            raise ValueError("redis_top_refresh_seconds must not be negative")
        if self.batch_size <= 0:
            raise ValueError("redis_batch_size must be positive")
        if self.retry_seconds < 0:
            raise ValueError("redis_retry_seconds must not be negative")

    @classmethod
    def from_options(cls, options: PipelineOptions, window_seconds: int) -> RedisSinkSettings:
        sink = options.view_as(RedisSinkOptions)
        return cls(
            url=redis_url_from_options(options),
            keys=RedisKeys(**option_values(RedisKeys, sink)),
            ranking=RankingSettings(window_seconds=window_seconds, **option_values(RankingSettings, sink)),
            **option_values(cls, sink),
        )

    def __repr__(self) -> str:
        # The URL may carry a password; keep it out of logs and pipeline graphs.
        return f"RedisSinkSettings(keys={self.keys}, ranking={self.ranking}, url=<redacted>)"


# --- Writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pending:
    """An aggregate waiting in the batch, with what is needed to re-emit it as a dead letter."""

    aggregate: WindowAggregate
    timestamp: Timestamp
    window: BoundedWindow


def dead_letter(aggregate: WindowAggregate, reason: str) -> DeadLetter:
    """The payload is the aggregate as JSON, so a replay can re-validate it with ``WindowAggregate``."""
    return DeadLetter.of(Stage.REDIS, reason, aggregate.model_dump_json().encode(), AGGREGATE_SOURCE)


def queue_writes(
    pipe: redis.client.Pipeline,
    config: RedisSinkSettings,
    panes: Mapping[tuple[int, str], WindowAggregate],
    now: float,
    refresh_top: bool,
) -> None:
    """Queues one batch's overwrites (and, if due, the ranking's recomputation) on a pipeline."""
    keys = config.keys
    by_bucket: dict[int, list[WindowAggregate]] = {}
    content_rows: dict[str, list[WindowAggregate]] = {}
    for (start, content_id), aggregate in panes.items():
        by_bucket.setdefault(start, []).append(aggregate)
        content_rows.setdefault(content_id, []).append(aggregate)

    for start, aggregates in sorted(by_bucket.items()):
        expires_at = bucket_expires_at(start, config.bucket_ttl_seconds)
        # A pane overwrites the entry unless the entry comes from a newer pane: two bundles of writes can
        # reach Redis out of order. Newer means emitted later, not larger, so a backfill (emitted now) can
        # still lower a bucket it rewrites (SPEC §7), which ZADD GT would refuse.
        entries: list[Any] = []
        for a in aggregates:
            entries += bucket_entry(a)
        bucket_keys = (keys.bucket(start), keys.bucket_events(start), keys.bucket_versions(start))
        pipe.eval(OVERWRITE_IF_NEWER, len(bucket_keys), *bucket_keys, *entries)
        for key in bucket_keys:
            pipe.expireat(key, expires_at)

    for content_id, aggregates in content_rows.items():
        newest = max(aggregates, key=lambda a: (a.emitted_at, a.window_start))
        key = keys.content(content_id)
        pipe.hset(
            key,
            mapping={
                "title": newest.title or "",
                "slug": newest.slug or "",
                "content_type": newest.content_type or "",
            },
        )
        pipe.expireat(key, content_expires_at((bucket_start(a) for a in aggregates), now, config.bucket_ttl_seconds))

    ranking = config.ranking
    pipe.hset(
        keys.meta(),
        mapping={"window_seconds": ranking.window_seconds, "horizon_minutes": ranking.horizon_minutes},
    )
    if refresh_top:
        starts = ranking.bucket_starts(now)
        top, top_events = keys.top(ranking.horizon_minutes), keys.top_events(ranking.horizon_minutes)
        # ZUNIONSTORE replaces the destination (and deletes it when every bucket is empty): no stale members.
        pipe.zunionstore(top, [keys.bucket(start) for start in starts])
        pipe.zunionstore(top_events, [keys.bucket_events(start) for start in starts])
        pipe.expire(top, config.top_ttl_seconds)
        pipe.expire(top_events, config.top_ttl_seconds)


class WriteTopContentFn(beam.DoFn):
    """Writes ranked window aggregates to Redis buckets in pipelined batches; failures become dead letters.

    One pipeline per ``batch_size`` aggregates and one at the end of each bundle: no per-element round
    trip. Writes are overwrites, so a batch that failed half-way is simply sent again.
    """

    def __init__(self, config: RedisSinkSettings, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._client: redis.Redis | None = None
        self._batch: list[_Pending] = []
        self._next_top_refresh = 0.0
        self._degraded_until = 0.0
        self._written = Metrics.counter(METRICS_NAMESPACE, "written")
        self._retried = Metrics.counter(METRICS_NAMESPACE, "retried")
        self._dead_lettered = Metrics.counter(METRICS_NAMESPACE, "dead_lettered")
        self._skipped_unranked = Metrics.counter(METRICS_NAMESPACE, "skipped_unranked")
        self._skipped_expired = Metrics.counter(METRICS_NAMESPACE, "skipped_expired")
        self._batches = Metrics.counter(METRICS_NAMESPACE, "batches")
        self._top_refreshes = Metrics.counter(METRICS_NAMESPACE, "top_refreshes")
        self._freshness = Metrics.distribution(METRICS_NAMESPACE, "commit_to_write_ms")
        self._repaired = Metrics.counter(METRICS_NAMESPACE, "repaired_after_outage")
        self._rejects = RejectCounter("redis")
        self._unwritten: dict[tuple[int, str], WindowAggregate] = {}
        """The newest pane of each bucket entry an outage dead-lettered, rewritten once Redis answers again."""

    def setup(self) -> None:
        config = self._config
        self._client = connect(config.url, config.connect_timeout_seconds, config.socket_timeout_seconds)

    def start_bundle(self) -> None:
        self._batch = []

    def process(
        self,
        aggregate: WindowAggregate,
        timestamp: Timestamp = beam.DoFn.TimestampParam,
        window: BoundedWindow = beam.DoFn.WindowParam,
    ) -> Iterator[Any]:
        try:
            bucket_entry(aggregate)
        except Exception as error:  # noqa: BLE001 - a pure conversion of this aggregate (dead_letters.py)
            yield self._rejects.rejected(Stage.REDIS, aggregate, error)
            return
        if not is_ranked(aggregate):
            self._skipped_unranked.inc()
            return
        config = self._config
        if window_length(aggregate) != config.ranking.window_seconds:
            # The ranking would mix windows of different lengths: a configuration error, not data to drop.
            self._dead_lettered.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER_TAG,
                dead_letter(
                    aggregate,
                    f"window of {window_length(aggregate):g} s, but the Redis sink ranks "
                    f"{config.ranking.window_seconds}-second windows",
                ),
            )
            return
        if bucket_expires_at(bucket_start(aggregate), config.bucket_ttl_seconds) <= self._clock():
            # Its bucket has already expired (and left the ranking): writing would only recreate it.
            self._skipped_expired.inc()
            return
        self._batch.append(_Pending(aggregate, timestamp, window))
        if len(self._batch) >= config.batch_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        yield from self._flush()

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client.connection_pool.disconnect()
            self._client = None

    def _flush(self) -> Iterator[beam.pvalue.TaggedOutput]:
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        now = self._clock()
        refresh_top = now >= self._next_top_refresh
        panes = latest_panes(pending.aggregate for pending in batch)
        # Right after a batch exhausted its retries, Redis is most likely still down: one attempt per batch
        # until it answers again, so an outage costs a bundle one connection attempt, not a whole backoff.
        retrying = self._retrying(0.0 if now < self._degraded_until else self._config.retry_seconds)
        try:
            self._execute(lambda pipe: queue_writes(pipe, self._config, panes, now, refresh_top), retrying)
        except redis.RedisError as exc:
            reason = failure_reason(exc, retrying.statistics)
            _log.warning("Redis sink: %d aggregates dead-lettered: %s", len(batch), reason)
            self._dead_lettered.inc(len(batch))
            if isinstance(exc, TRANSIENT_ERRORS):
                # A window that gets no later pane would keep its stale entry until it expires: keep the
                # newest pane of each entry and write it when Redis answers again (``_repair``).
                self._unwritten = latest_panes([*self._unwritten.values(), *panes.values()])
            for pending in batch:
                yield beam.pvalue.TaggedOutput(
                    DEAD_LETTER_TAG,
                    WindowedValue(dead_letter(pending.aggregate, reason), pending.timestamp, (pending.window,)),
                )
            return
        self._batches.inc()
        self._written.inc(len(batch))
        self._record_freshness(panes.values())
        if refresh_top:
            self._top_refreshes.inc()
            self._next_top_refresh = now + self._config.top_refresh_seconds
        if self._unwritten:
            self._repair(now)

    def _repair(self, now: float) -> None:
        """Rewrites the entries an outage dead-lettered, now that a write went through again. Safe in any order:
        an entry is only overwritten by a newer pane, so a pane superseded meanwhile changes nothing. Best effort
        (the dead letters stay the record): lost with the worker, retried at the next write if Redis fails again.
        """
        ttl = self._config.bucket_ttl_seconds
        live = {key: pane for key, pane in self._unwritten.items() if bucket_expires_at(key[0], ttl) > now}
        if live:
            try:
                self._execute(lambda pipe: queue_writes(pipe, self._config, live, now, True), self._retrying(0.0))
            except redis.RedisError as exc:
                _log.info("Redis sink: %d entries wait for Redis to answer again: %s", len(live), exc)
                self._unwritten = live
                return
            self._repaired.inc(len(live))
            _log.warning("Redis sink: rewrote %d bucket entries that an outage had dead-lettered", len(live))
        self._unwritten = {}

    def _record_freshness(self, panes: Iterable[WindowAggregate]) -> None:
        """The Distribution for monitoring, and a capped list in Redis itself for scripts/run-local's view."""
        samples = freshness_samples(panes, int(self._clock() * 1000))
        if not samples or self._client is None:
            return
        for sample in samples:
            self._freshness.update(sample)
        written_at = int(self._clock() * 1000)
        key = self._config.keys.freshness()
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.lpush(key, *(f"{written_at} {sample}" for sample in samples))
            pipe.ltrim(key, 0, FRESHNESS_SAMPLES - 1)
            pipe.execute()
        except redis.RedisError as exc:  # a metric: never worth a retry or a dead letter
            _log.debug("Redis sink: freshness samples not written: %s", exc)

    def _retrying(self, retry_seconds: float) -> tenacity.Retrying:
        """Transient errors retried for ``retry_seconds`` (0: one attempt), then the last one raised."""
        return retrying(
            tenacity.retry_if_exception_type(TRANSIENT_ERRORS),
            _RETRY_BACKOFF,
            within_seconds=retry_seconds,
            before_sleep=lambda _state: self._retried.inc(),
        )

    def _execute(self, queue: Callable[[redis.client.Pipeline], None], retrying: tenacity.Retrying) -> None:
        assert self._client is not None, "setup() opens the client"
        try:
            for attempt in retrying:
                with attempt:
                    # A pipeline is reset after execute(), even a failed one, so each attempt queues anew.
                    pipe = self._client.pipeline(transaction=False)
                    queue(pipe)
                    pipe.execute()
        except TRANSIENT_ERRORS:
            self._degraded_until = self._clock() + _DEGRADED_SECONDS
            raise
        self._degraded_until = 0.0


def failure_reason(exc: redis.RedisError, statistics: Mapping[str, Any]) -> str:
    """A dead letter's reason; ``statistics`` are the retries' (tenacity's attempt count and time)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        attempts = statistics.get("attempt_number", 1)
        seconds = statistics.get("delay_since_first_attempt", 0.0)
        return f"redis unreachable after {attempts} attempt(s) in {seconds:.1f} s: {type(exc).__name__}: {exc}"
    return f"redis rejected the write: {type(exc).__name__}: {exc}"


class WriteTopContentToRedis(beam.PTransform):
    """WindowAggregate -> Redis top-content buckets; returns the dead letters of what could not be written.

    The aggregates, and so the dead letters, are in the global window already (``AggregateWindows``).
    """

    def __init__(self, config: RedisSinkSettings) -> None:
        super().__init__()
        self._config = config

    def expand(self, aggregates: beam.PCollection[WindowAggregate]) -> beam.PCollection[DeadLetter]:
        outputs = aggregates | "OverwriteBuckets" >> beam.ParDo(WriteTopContentFn(self._config)).with_outputs(
            DEAD_LETTER_TAG, main="written"
        )
        return outputs[DEAD_LETTER_TAG]
