"""The one rule for steps that handle outside data: no element-level exception escapes them.

A record that a step cannot convert (decode, enrich, turn into a sink's row or wire format) becomes a
``DeadLetter`` on the ``dead_letter`` tag, with the stage, the reason, the element as payload and its source
coordinates, and a counter goes up. Letting the exception escape instead would fail the bundle; the runner
retries it, hits the same record again, and the job stops or crash-loops on one bad record (issue 16).

Only *pure per-element conversions* are guarded: functions of the element alone, with no I/O. A sink's
I/O (Redis, BigQuery appends, HTTP POSTs, the PostgreSQL content lookup) is never called inside a guard,
so an outage still fails the bundle or goes through the sink's own retry path, and is never mistaken for
bad input (docs/decisions.md, "Bad input").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from pydantic import BaseModel

from transforms.lists import per_item
from transforms.model import (
    DeadLetter,
    EngagementEvent,
    EnrichedEvent,
    RawRecord,
    SourceCoordinates,
    Stage,
    WindowAggregate,
)

DEAD_LETTER_TAG = "dead_letter"
METRICS_NAMESPACE = "dead_letters"

PAYLOAD_EXCERPT_BYTES = 65_536
"""A payload over the record size limit is kept as its first bytes only: enough to see what it is, small
enough for a dead-letter row (its Kafka coordinates lead to the whole record)."""
REASON_MAX_CHARS = 1_000

_AGGREGATE_SOURCE = SourceCoordinates(kind="aggregate")


class RejectedInputError(ValueError):
    """Raised by a rule that refuses an element; the message is the whole dead-letter reason."""


def failure_reason(error: BaseException) -> str:
    """A rule's refusal is its message; anything else is unexpected and keeps its type, so a bug is
    recognisable as one in the dead-letter table."""
    text = str(error) if isinstance(error, RejectedInputError) else f"{type(error).__name__}: {error}"
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 1] + "…"


def excerpt(payload: bytes | None, limit: int) -> bytes | None:
    return payload if payload is None or len(payload) <= limit else payload[:PAYLOAD_EXCERPT_BYTES]


def _storable_id(value: Any) -> int | None:
    # The dead-letter table's id columns are INT64: an id outside it (the very reason for some dead letters)
    # stays in the payload only, or the dead letter itself could not be written.
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None


def _event_source(event_id: int) -> SourceCoordinates:
    # Past decode an element no longer carries its Kafka position; its row in the source of truth names it.
    return SourceCoordinates(kind="postgres", table="engagement_events", row_id=_storable_id(event_id))


def _repr(element: Any) -> bytes:
    return repr(element).encode("utf-8", errors="backslashreplace")


def _model_json(model: BaseModel) -> bytes:
    try:
        return model.model_dump_json().encode("utf-8")
    except ValueError:  # the very text that failed the step, e.g. a lone surrogate, may not serialize either
        return _repr(model)


def describe_element(element: Any) -> tuple[bytes | None, SourceCoordinates, int | None]:
    """(payload, source coordinates, event id) of any element a guarded step handles."""
    if isinstance(element, RawRecord):
        return element.value, element.source, None
    if isinstance(element, DeadLetter):
        return element.payload_bytes, element.source, element.event_id
    if isinstance(element, EnrichedEvent):
        return _model_json(element), _event_source(element.event.id), _storable_id(element.event.id)
    if isinstance(element, EngagementEvent):
        return _model_json(element), _event_source(element.id), _storable_id(element.id)
    if isinstance(element, WindowAggregate):
        return _model_json(element), _AGGREGATE_SOURCE, None
    if isinstance(element, dict):  # a BigQuery row of transforms/rows.py
        event_id = _storable_id(element.get("event_id"))
        text = json.dumps(element, sort_keys=True, default=str, ensure_ascii=False)
        payload = text.encode("utf-8", errors="backslashreplace")  # a lone surrogate shows as \udxxx
        if event_id is not None:
            return payload, _event_source(event_id), event_id
        return payload, _AGGREGATE_SOURCE, None
    return _repr(element), _AGGREGATE_SOURCE, None


def reject(stage: Stage, element: Any, error: BaseException, payload_limit: int = 1_000_000) -> DeadLetter:
    """The dead letter of ``element``, which ``stage`` could not convert because of ``error``."""
    try:
        payload, source, event_id = describe_element(element)
    except Exception:  # noqa: BLE001 - the element is broken in a way even describing it shows
        payload, source, event_id = _repr(element), _AGGREGATE_SOURCE, None
    return DeadLetter.of(stage, failure_reason(error), excerpt(payload, payload_limit), source, event_id=event_id)


class RejectCounter:
    """Counts a step's dead letters under ``dead_letters/<step>``, next to the per-stage totals."""

    def __init__(self, step: str) -> None:
        self._counter = Metrics.counter(METRICS_NAMESPACE, f"rejected.{step}")

    def rejected(self, stage: Stage, element: Any, error: BaseException) -> beam.pvalue.TaggedOutput:
        self._counter.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, reject(stage, element, error))


class GuardedMapFn(beam.DoFn):
    """``convert(element, *args)`` on the main output; an exception from it, a dead letter."""

    def __init__(self, stage: Stage, step: str, convert: Callable[..., Any], *args: Any) -> None:
        self._stage = stage
        self._convert = convert
        self._args = args
        self._rejects = RejectCounter(step)

    def process(self, element: Any) -> Iterator[Any]:
        try:
            converted = self._convert(element, *self._args)
        except Exception as error:  # noqa: BLE001 - the point: any per-element failure is a dead letter
            yield self._rejects.rejected(self._stage, element, error)
            return
        yield converted


class GuardedMap(beam.PTransform):
    """``beam.Map(convert)`` for a pure conversion of outside data: outputs ``converted`` and ``dead_letter``.

    ``convert`` must not do I/O: whatever it raises is taken for a property of the element.
    """

    def __init__(
        self,
        stage: Stage,
        step: str,
        convert: Callable[..., Any],
        *args: Any,
        output_type: Any = None,
        lists: bool = False,
    ) -> None:
        """``lists``: the input holds lists, and ``converted`` the lists of their items' conversions
        (``transforms/lists.py``)."""
        super().__init__()
        self._fn = per_item(GuardedMapFn(stage, step, convert, *args), lists)
        self._output_type = output_type

    def expand(self, elements: beam.PCollection) -> beam.pvalue.DoOutputsTuple:
        convert = beam.ParDo(self._fn)
        if self._output_type is not None:  # e.g. a key type GroupIntoBatches needs a deterministic coder for
            convert = convert.with_output_types(self._output_type)
        return elements | "Convert" >> convert.with_outputs(DEAD_LETTER_TAG, main="converted")


def flatten_dead_letters(label: str, *collections: beam.PCollection[DeadLetter]) -> beam.PCollection[DeadLetter]:
    """One collection of dead letters in the global window, as the dead-letter sink takes them.

    Stages emit dead letters in their own windows (decode's are in event time, a sink's in the global one).
    """
    return [
        collection | f"{label}: global window {index}" >> beam.WindowInto(GlobalWindows())
        for index, collection in enumerate(collections)
    ] | label >> beam.Flatten()
