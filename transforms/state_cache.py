"""Two process-wide adjustments to the Python SDK worker's user state, applied by every stateful DoFn.

**Sizing the cache.** Beam's state cache weighs every value it stores with ``objsize.get_deep_size``. By
default objsize first collects the globals of every loaded module (about 1,800 modules in this worker) to
leave them out of the measure, on each call, which made it the Python worker's largest cost in the streaming
job (py-spy, docs/benchmarks.md). Our state values (bytes, small tuples and dataclasses) reference no module
globals, so skipping that step measures them the same, far faster.

**Committing in one round trip.** At the end of a bundle the worker writes back every state cell the bundle
touched (``FnApiUserStateContext.commit``), one cell after the other, waiting for the runner's answer to each
before it sends the next. A stage that touched 200 keys waits for 200 round trips before its bundle, and the
outputs it holds, can end. The requests travel on one ordered stream, which the runner answers in order, so
sending them all and then waiting for every answer writes the same state in the same order, in about one
round trip (docs/local-streaming.md, "The SDK worker waited on its own state writes").

Both hold on each worker, local or on Dataflow, once a stateful DoFn's ``setup()`` has run, before its first
bundle ends.

**Values the cache weighs at once.** Even without the module globals, objsize walks every object a cached value
holds, and the cache weighs a cell again each time it is written. A window's running totals hold the set of its
distinct users: thousands of strings, milliseconds to weigh, on every pane of a busy window. Such values live in
state as their pickle (``PickledCell``): bytes, weighed in microseconds, for one ``pickle.loads`` per read.
The pickle is what the state's coder wrote to the runner anyway.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from typing import Any

import objsize
from apache_beam.coders import BytesCoder
from apache_beam.runners.worker import bundle_processor
from apache_beam.transforms.userstate import ReadModifyWriteRuntimeState, ReadModifyWriteStateSpec

_LOG = logging.getLogger(__name__)
_ORIGINAL_COMMIT: Callable[[Any], None] = bundle_processor.FnApiUserStateContext.commit


def measure_cached_state_cheaply() -> None:
    """Idempotent and process-wide; only the size estimate's exclusions change, never a value."""
    objsize.default_settings.update(exclude_modules_globals=False)


def _state_writes(state: Any) -> list[Any] | None:
    """The requests that write ``state`` back, sent now; None when its kind is not a bag underneath."""
    bag = getattr(state, "_underlying_bag_state", state)
    if type(bag) is not bundle_processor.SynchronousBagRuntimeState:
        return None
    handler, key = bag._state_handler, bag._state_key
    futures = []
    if bag._cleared:
        futures.append(handler.clear(key))
    if bag._added_elements:
        futures.append(handler.extend(key, bag._value_coder.get_impl(), bag._added_elements))
    return futures


def commit_in_one_round_trip(context: Any) -> None:
    """``FnApiUserStateContext.commit`` with every write sent before the first answer is awaited."""
    pending = []
    for state in context._all_states.values():
        futures = _state_writes(state)
        if futures is None:
            state.commit()  # a kind we do not know (set, multimap): Beam's own commit, in turn
        else:
            pending.extend(futures)
    for future in pending:
        response = future.get()
        if response is not None and response.error:
            raise RuntimeError(f"the runner refused a state write: {response.error}")


def commit_state_in_one_round_trip() -> None:
    """Idempotent and process-wide; falls back to Beam's commit if its internals are not what we expect."""
    context_class = bundle_processor.FnApiUserStateContext
    if context_class.commit is commit_in_one_round_trip:
        return
    probe = bundle_processor.SynchronousBagRuntimeState(None, None, None)  # type: ignore[arg-type]
    expected = {"_state_handler", "_state_key", "_value_coder", "_cleared", "_added_elements"}
    if context_class.commit is not _ORIGINAL_COMMIT or not expected <= set(vars(probe)):
        _LOG.warning("Beam's state commit is not the one this module knows; state commits stay one at a time")
        return
    context_class.commit = commit_in_one_round_trip


def prepare_worker_state() -> None:
    """Both adjustments; call from every stateful DoFn's ``setup()``."""
    measure_cached_state_cheaply()
    commit_state_in_one_round_trip()


def pickled_cell(name: str) -> ReadModifyWriteStateSpec:
    """A ReadModifyWrite state cell for ``PickledCell``: it holds bytes."""
    return ReadModifyWriteStateSpec(name, BytesCoder())


class PickledCell:
    """A ``pickled_cell`` read and written as the value it holds, kept as its pickle in state and in the cache."""

    def __init__(self, cell: ReadModifyWriteRuntimeState) -> None:
        self._cell = cell

    def read(self) -> Any:
        data = self._cell.read()
        return None if data is None else pickle.loads(data)  # noqa: S301 - our own state, written just below

    def write(self, value: Any) -> None:
        self._cell.write(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def clear(self) -> None:
        self._cell.clear()
