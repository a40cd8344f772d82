"""A second signal during the shutdown the first one started is ignored, so the shutdown finishes."""

from __future__ import annotations

import os
import signal

import pytest

from devstack.interrupts import StopOnFirstSignal, stop_on_first_signal


@pytest.fixture
def restore_handlers():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_only_the_first_signal_interrupts():
    handler = StopOnFirstSignal()

    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)
    handler(signal.SIGINT, None)
    handler(signal.SIGTERM, None)

    assert handler.received == signal.SIGINT


def test_two_signals_in_a_row_still_let_the_shutdown_run_to_its_end(restore_handlers):
    # What `timeout -s INT` does: the child gets the signal, then its whole process group gets it again.
    stop_on_first_signal()
    shutdown_steps: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # noqa: PT012 - the shutdown is the point of the test
        try:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the signals are handled between bytecodes
                pass
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # a third, during the shutdown itself
            for _ in range(1000):
                pass
            shutdown_steps.append("generator stopped")
            shutdown_steps.append("pipeline stopped")

    assert shutdown_steps == ["generator stopped", "pipeline stopped"]
