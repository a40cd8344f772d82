"""Batches the API refused for now, retried from state on a timer, so no bundle waits out an outage.

A streaming ``PostBatches`` bundle tries each batch once. A batch whose answer is worth retrying (a
connection error, a timeout, 408, 429, 5xx) leaves that bundle at once as a ``DeferredBatch`` keyed by its
shard, and ``RetryDeferredBatchesFn`` keeps it in the shard's state. A processing-time timer per shard starts
each retry round:

- the oldest batch is tried first; if it fails again, the round stops there (the endpoint is still down) and
  the next round is set after the backoff, floored by the server's Retry-After;
- if it is delivered, the rest of the shard's batches are sent, several at a time;
- a batch out of attempts or out of its retry budget (counted from its first attempt, in wall-clock time)
  becomes dead letters with the last answer, as in ``http_delivery.deliver``.

Why: a bundle that sleeps between retries holds a runner's bundle slot for the whole outage. Prism runs at
most 8 bundles at a time for a whole job, and a minute-long outage filled them all with ``PostBatches``
bundles, which stopped the Kafka read and Redis with it (docs/reliability.md). A round here takes one
request when the endpoint is down, and a timer costs nothing while it waits. The shard is the state's key,
so every runner runs at most one round per shard at a time.

Exactly once is unchanged: a deferred batch keeps its events, so every retry sends the same body with the same
key; and it was recorded in the intent log before its first attempt, so a job that stops while it waits
sends it again after a resume (docs/restarts.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from transforms.model import DeadLetter
from transforms.sinks.http_client import ApiClient, SinkCounters, wall_clock
from transforms.sinks.http_delivery import Attempt, RetryPolicy, Verdict, delivery_of
from transforms.sinks.http_wire import Batch

if TYPE_CHECKING:
    from transforms.sinks.http_api import HttpSinkSettings


@dataclass(frozen=True)
class DeferredBatch:
    """A batch waiting for its next attempt, with what its retry budget needs."""

    batch: Batch
    first_attempt_at: float
    """Wall-clock seconds since the epoch of the batch's first POST."""
    attempts: int
    last: Attempt
    """The last answer: the floor of the next wait (Retry-After) and the reason if the batch gives up."""


def next_round_wait(
    policy: RetryPolicy, failed_rounds: int, retry_after: float | None, uniform: Callable[[], float] = random.random
) -> float:
    """The wait before a shard's next round: the policy's full jitter and Retry-After floor, and at least half
    the initial backoff, so a round never follows the last one at once."""
    return max(policy.delay(failed_rounds, retry_after, uniform), policy.initial_backoff_seconds / 2)


class RetryDeferredBatchesFn(beam.DoFn):
    """(shard, DeferredBatch) -> dead letters of batches that gave up; retries in rounds from a timer."""

    WAITING = BagStateSpec("waiting", PickleCoder())
    FAILED_ROUNDS = ReadModifyWriteStateSpec("failed_rounds", VarIntCoder())
    """Rounds in a row that failed; absent when no round is set."""
    ROUND = TimerSpec("round", TimeDomain.REAL_TIME)

    def __init__(self, settings: HttpSinkSettings) -> None:
        self._settings = settings
        self._retry = settings.retry

    def setup(self) -> None:
        # The token is read here, on the worker (ApiClient), never captured into the pickled graph.
        self._client = ApiClient(self._settings)
        self._pool = ThreadPoolExecutor(max_workers=self._settings.max_in_flight, thread_name_prefix="http-retry")
        self._counters = SinkCounters()

    def teardown(self) -> None:
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._client.close()

    def process(
        self,
        element: tuple[int, DeferredBatch],
        waiting: beam.DoFn.StateParam = beam.DoFn.StateParam(WAITING),
        failed_rounds: beam.DoFn.StateParam = beam.DoFn.StateParam(FAILED_ROUNDS),
        round_timer: beam.DoFn.TimerParam = beam.DoFn.TimerParam(ROUND),
    ) -> None:
        deferred = element[1]
        waiting.add(deferred)
        if failed_rounds.read() is None:  # no round set for this shard yet
            failed_rounds.write(0)
            wait = next_round_wait(self._retry, 1, deferred.last.retry_after)
            round_timer.set(Timestamp.of(wall_clock() + wait))

    @on_timer(ROUND)
    def retry_round(
        self,
        waiting: beam.DoFn.StateParam = beam.DoFn.StateParam(WAITING),
        failed_rounds: beam.DoFn.StateParam = beam.DoFn.StateParam(FAILED_ROUNDS),
        round_timer: beam.DoFn.TimerParam = beam.DoFn.TimerParam(ROUND),
    ) -> Iterator[DeadLetter]:
        batches: list[DeferredBatch] = sorted(waiting.read(), key=lambda deferred: deferred.first_attempt_at)
        waiting.clear()
        still_waiting, last_failure = [], None
        for deferred, attempt in self._attempt_round(batches):
            if attempt is None:  # not tried: an older batch of the round failed
                still_waiting.append(deferred)
                continue
            self._counters.retried.inc()
            elapsed = wall_clock() - deferred.first_attempt_at
            if attempt.verdict is Verdict.DELIVERED:
                self._counters.delivered(deferred.batch, attempt.replayed, elapsed)
            elif attempt.verdict is Verdict.REJECTED:
                yield from self._dead_letters(deferred.batch, delivery_of(attempt, deferred.attempts + 1).reason)
            else:
                still_waiting.append(replace(deferred, attempts=deferred.attempts + 1, last=attempt))
                last_failure = attempt
        if not still_waiting:
            failed_rounds.clear()
            return
        rounds = (failed_rounds.read() or 0) + 1
        wait = next_round_wait(self._retry, rounds, last_failure.retry_after if last_failure else None)
        kept = 0
        for deferred in still_waiting:
            elapsed = wall_clock() - deferred.first_attempt_at
            if self._retry.exhausted(deferred.attempts, elapsed, wait):
                reason = self._retry.give_up_reason(deferred.attempts, elapsed, wait, deferred.last)
                yield from self._dead_letters(deferred.batch, reason)
            else:
                waiting.add(deferred)
                kept += 1
        if kept:
            failed_rounds.write(rounds)
            round_timer.set(Timestamp.of(wall_clock() + wait))
        else:
            failed_rounds.clear()

    def _attempt_round(self, batches: list[DeferredBatch]) -> Iterable[tuple[DeferredBatch, Attempt | None]]:
        """The oldest batch alone first; the others, several at a time, only if it got through."""
        if not batches:
            return []
        oldest, rest = batches[0], batches[1:]
        first = self._client.send(oldest.batch)
        if first.verdict is Verdict.RETRY:
            return [(oldest, first), *((deferred, None) for deferred in rest)]
        sent = self._pool.map(lambda deferred: self._client.send(deferred.batch), rest)
        return [(oldest, first), *zip(rest, sent, strict=True)]

    def _dead_letters(self, batch: Batch, reason: str) -> Iterator[DeadLetter]:
        return self._counters.dead_letters(
            batch, f"HTTP API {self._client.endpoint_shown} {reason} (Idempotency-Key {batch.key})"
        )
