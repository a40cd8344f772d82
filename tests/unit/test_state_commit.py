"""A bundle's state writes all leave before the first answer is awaited, and are the writes Beam's commit makes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.portability.api import beam_fn_api_pb2
from apache_beam.runners.worker import bundle_processor

from transforms import state_cache


class Answer:
    """A runner's answer to one state request, logged when the worker waits for it."""

    def __init__(self, log: list[tuple], key: str, error: str = "") -> None:
        self._log, self._key, self._error = log, key, error

    def get(self) -> beam_fn_api_pb2.StateResponse:
        self._log.append(("await", self._key))
        return beam_fn_api_pb2.StateResponse(error=self._error)


class RecordingStateHandler:
    """Stands in for the worker's gRPC state channel: Beam offers no local one to commit into."""

    def __init__(self, refuse: str | None = None) -> None:
        self.log: list[tuple] = []
        self._refuse = refuse

    def clear(self, key: str) -> Answer:
        self.log.append(("clear", key))
        return Answer(self.log, key)

    def extend(self, key: str, coder: Any, elements: list[Any]) -> Answer:
        self.log.append(("extend", key, list(elements)))
        return Answer(self.log, key, "no space left" if key == self._refuse else "")


def bundle_context(handler: RecordingStateHandler) -> SimpleNamespace:
    """What a bundle leaves to commit: a value rewritten, a bag appended to, a cell cleared, one untouched."""

    def bag(key: str, coder: Any) -> bundle_processor.SynchronousBagRuntimeState:
        return bundle_processor.SynchronousBagRuntimeState(handler, key, coder)  # type: ignore[arg-type]

    totals = bundle_processor.ReadModifyWriteRuntimeState(bag("totals", PickleCoder()))
    totals.write({"events": 3})
    batch = bag("batch", VarIntCoder())
    batch.add(7)
    batch.add(8)
    expired = bundle_processor.ReadModifyWriteRuntimeState(bag("expired", PickleCoder()))
    expired.clear()
    untouched = bundle_processor.ReadModifyWriteRuntimeState(bag("untouched", PickleCoder()))
    return SimpleNamespace(_all_states={"a": totals, "b": batch, "c": expired, "d": untouched})


def writes(log: list[tuple]) -> list[tuple]:
    return [entry for entry in log if entry[0] != "await"]


def test_every_write_is_sent_before_any_answer_is_awaited():
    handler = RecordingStateHandler()

    state_cache.commit_in_one_round_trip(bundle_context(handler))

    kinds = [entry[0] for entry in handler.log]
    assert kinds == ["clear", "extend", "extend", "clear", "await", "await", "await", "await"]


def test_the_writes_are_the_ones_beams_own_commit_makes_in_the_same_order():
    ours, beams = RecordingStateHandler(), RecordingStateHandler()

    state_cache.commit_in_one_round_trip(bundle_context(ours))
    state_cache._ORIGINAL_COMMIT(bundle_context(beams))  # type: ignore[arg-type]

    assert writes(ours.log) == writes(beams.log)
    assert writes(ours.log) == [
        ("clear", "totals"),
        ("extend", "totals", [{"events": 3}]),
        ("extend", "batch", [7, 8]),
        ("clear", "expired"),
    ]
    # Beam's commit waits after each cell: one round trip per cell instead of one in all.
    assert [entry[0] for entry in beams.log].count("await") == 3


def test_a_refused_write_fails_the_bundle():
    handler = RecordingStateHandler(refuse="batch")

    with pytest.raises(RuntimeError, match="refused a state write: no space left"):
        state_cache.commit_in_one_round_trip(bundle_context(handler))


def test_installing_it_is_idempotent_and_replaces_beams_commit(monkeypatch):
    monkeypatch.setattr(bundle_processor.FnApiUserStateContext, "commit", state_cache._ORIGINAL_COMMIT)

    state_cache.commit_state_in_one_round_trip()
    state_cache.commit_state_in_one_round_trip()

    assert bundle_processor.FnApiUserStateContext.commit is state_cache.commit_in_one_round_trip


def test_an_unknown_beam_commit_is_left_alone(monkeypatch, caplog):
    def someone_elses_commit(self: Any) -> None:
        return None

    monkeypatch.setattr(bundle_processor.FnApiUserStateContext, "commit", someone_elses_commit)

    state_cache.commit_state_in_one_round_trip()

    assert bundle_processor.FnApiUserStateContext.commit is someone_elses_commit
    assert "stay one at a time" in caplog.text
