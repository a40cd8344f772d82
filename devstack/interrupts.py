"""One stop per run, however many signals ask for it.

Ctrl-C, ``timeout -s INT`` (which signals its child and then the child's whole process group) and a supervisor's
SIGTERM can each deliver a signal more than once. The first becomes a ``KeyboardInterrupt`` and starts the
shutdown; a later one must not interrupt the shutdown itself, which would leave the children, running in
sessions of their own, behind. Setting SIG_IGN at the start of the shutdown is not enough: a second signal can
land between the first ``KeyboardInterrupt`` and that line.
"""

from __future__ import annotations

import signal
from types import FrameType


class StopOnFirstSignal:
    """A signal handler that raises ``KeyboardInterrupt`` for the first signal and ignores every later one."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        raise KeyboardInterrupt


def stop_on_first_signal() -> StopOnFirstSignal:
    """Routes SIGINT and SIGTERM to one ``StopOnFirstSignal``; SIGINT explicitly, since a shell starts background
    jobs ignoring it."""
    handler = StopOnFirstSignal()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return handler
