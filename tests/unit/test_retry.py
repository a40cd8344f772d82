"""The one retry policy (transforms/retry.py): full-jitter waits, attempts, a deadline never slept towards."""

from __future__ import annotations

import pytest
import tenacity

from transforms.retry import Backoff, retrying


class Flaky:
    """Fails ``failures`` times with ``error``, then returns ``value``."""

    def __init__(self, failures: int, error: Exception = ConnectionError("down"), value: str = "ok") -> None:
        self.failures, self.error, self.value, self.calls = failures, error, value, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.value


def test_backoff_ceilings_double_up_to_the_cap_and_bad_bounds_are_refused():
    backoff = Backoff(initial_seconds=0.5, max_seconds=30)
    assert [backoff.ceiling(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30
    with pytest.raises(ValueError, match="positive"):
        Backoff(0, 1)
    with pytest.raises(ValueError, match="at least the initial"):
        Backoff(2, 1)


def test_retries_what_it_is_told_to_with_full_jitter_waits_then_succeeds():
    waits: list[float] = []
    flaky = Flaky(failures=3)
    retry = retrying(
        tenacity.retry_if_exception_type(ConnectionError), Backoff(0.5, 2.0), attempts=5, sleep=waits.append
    )
    assert retry(flaky) == "ok"
    assert flaky.calls == 4
    assert len(waits) == 3
    assert all(0 <= wait <= ceiling for wait, ceiling in zip(waits, [0.5, 1.0, 2.0], strict=True))


def test_out_of_attempts_the_last_error_is_raised_again_and_other_errors_at_once():
    flaky = Flaky(failures=10)
    retry = retrying(
        tenacity.retry_if_exception_type(ConnectionError), Backoff(0.1, 0.1), attempts=3, sleep=lambda _: None
    )
    with pytest.raises(ConnectionError, match="down"):
        retry(flaky)
    assert flaky.calls == 3

    refused = Flaky(failures=10, error=ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        retry(refused)
    assert refused.calls == 1


def test_a_wait_that_would_pass_the_deadline_is_never_started():
    waits: list[float] = []
    flaky = Flaky(failures=10)
    retry = retrying(
        tenacity.retry_if_exception_type(ConnectionError),
        Backoff(1, 1),
        within_seconds=3,
        wait=tenacity.wait_fixed(5),
        sleep=waits.append,
    )
    with pytest.raises(ConnectionError):
        retry(flaky)
    assert (flaky.calls, waits) == (1, [])


def test_zero_seconds_is_one_attempt_and_a_rejected_result_ends_in_retry_error():
    flaky = Flaky(failures=1)
    with pytest.raises(ConnectionError):
        retrying(tenacity.retry_if_exception_type(ConnectionError), Backoff(0.1, 1), within_seconds=0)(flaky)
    assert flaky.calls == 1

    retry = retrying(
        tenacity.retry_if_result(lambda value: value == "again"), Backoff(0.1, 1), attempts=2, sleep=lambda _: None
    )
    with pytest.raises(tenacity.RetryError):
        retry(lambda: "again")
    assert retry.statistics["attempt_number"] == 2
