"""Keeps the SDK worker's state cache from costing more CPU than the state reads it saves.

Beam's state cache weighs every value it stores with ``objsize.get_deep_size``. By default objsize first
collects the globals of every loaded module (about 1,800 modules in this worker) to leave them out of the
measure, on each call: 0.7 ms per cached write, 40 % of the Python worker's CPU in the streaming job
(py-spy, docs/benchmarks.md). Our state values (bytes, small tuples and dataclasses) reference no module
globals, so skipping that step measures them the same, in 11 µs. objsize offers the switch as a process-wide
setting (``default_settings.update``); every stateful DoFn applies it in ``setup()``, so it holds on each
worker, local or on Dataflow, before the first state write.
"""

from __future__ import annotations

import objsize


def measure_cached_state_cheaply() -> None:
    """Idempotent and process-wide; only the size estimate's exclusions change, never a value."""
    objsize.default_settings.update(exclude_modules_globals=False)
