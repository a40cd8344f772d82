"""A compact, fast pickle form for the pipeline's records, which every stage boundary pays for.

Beam encodes an element of a Python type it has no coder for with pickle, at every fused-stage boundary, in
state, and in a local runner's memory. Pickling a pydantic model goes through ``__getstate__``: the
instance's ``__dict__`` with every ``UUID``, ``datetime`` and ``Decimal`` pickled by reference to its class,
and the model's own bookkeeping, which made decoding elements a large share of the SDK worker's time
(docs/benchmarks.md, "Session 6").

``CompactPickleModel.__reduce__`` pickles a model instead as one reference to its class and a flat tuple of
primitives (UUIDs as 16 bytes, UTC datetimes as epoch microseconds, decimals as text, enums as their value,
nested models as their own tuples). Unpickling rebuilds the model without validating it again: it was
validated when it was first built, and the tuple holds exactly what it held.
"""

from __future__ import annotations

import types
import typing
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, ClassVar, Self
from uuid import UUID

from pydantic import BaseModel

from transforms.instants import epoch_micros, utc_datetime

_RAW, _UUID, _DATETIME, _DECIMAL, _MODEL, _ENUM = range(6)


def _field_kind(annotation: Any) -> tuple[int, Any]:
    """How a field of this annotation travels: (kind, the model or enum class for nested kinds)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    for candidate in options or (annotation,):
        if candidate is type(None):
            continue
        if candidate is UUID:
            return _UUID, None
        if candidate is datetime:
            return _DATETIME, None
        if candidate is Decimal:
            return _DECIMAL, None
        if isinstance(candidate, type) and issubclass(candidate, CompactPickleModel):
            return _MODEL, candidate
        if isinstance(candidate, type) and issubclass(candidate, Enum):
            return _ENUM, candidate
    return _RAW, None


def _utc_micros(value: datetime) -> int | datetime:
    # Only UTC instants become integers; any other datetime keeps its own zone (or lack of one).
    if value.tzinfo is not UTC:
        return value
    return epoch_micros(value)


def _from_utc_micros(value: int | datetime) -> datetime:
    return utc_datetime(value) if type(value) is int else value


class CompactPickleModel(BaseModel):
    """A pydantic model that pickles as a flat tuple of primitives (see the module docstring)."""

    # Per class: field names in order, then the positions of each kind that needs converting. Converting by
    # kind over precomputed positions keeps the per-element work to the fields that need it.
    _pickle_names: ClassVar[tuple[str, ...]] = ()
    _pickle_converted: ClassVar[tuple[tuple[int, int, Any], ...]] = ()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._pickle_names = tuple(cls.model_fields)
        converted = []
        for position, field in enumerate(cls.model_fields.values()):
            kind, nested = _field_kind(field.annotation)
            if kind != _RAW:
                converted.append((position, kind, nested))
        cls._pickle_converted = tuple(converted)

    def _packed(self) -> tuple[Any, ...]:
        values = self.__dict__
        names = self._pickle_names
        packed = [values[name] for name in names]
        for position, kind, _nested in self._pickle_converted:
            value = packed[position]
            if value is None:
                continue
            if kind == _UUID:
                packed[position] = value.bytes
            elif kind == _DATETIME:
                packed[position] = _utc_micros(value)
            elif kind == _DECIMAL:
                packed[position] = str(value)
            elif kind == _MODEL:
                packed[position] = value._packed()
            else:
                packed[position] = value.value
        fields_set = self.__pydantic_fields_set__
        # The fields set explicitly, as a bit mask; -1 (the usual case) when all of them were.
        mask = -1
        if len(fields_set) != len(names):
            mask = sum(1 << position for position, name in enumerate(names) if name in fields_set)
        packed.append(mask)
        return tuple(packed)

    @classmethod
    def _from_packed(cls, packed: tuple[Any, ...]) -> Any:
        names = cls._pickle_names
        values = list(packed)
        mask = values.pop()
        for position, kind, nested in cls._pickle_converted:
            value = values[position]
            if value is None:
                continue
            if kind == _UUID:
                values[position] = UUID(bytes=value)
            elif kind == _DATETIME:
                values[position] = _from_utc_micros(value)
            elif kind == _DECIMAL:
                values[position] = Decimal(value)
            elif kind == _MODEL:
                values[position] = nested._from_packed(value)
            else:
                values[position] = nested(value)
        fields_set = set(names) if mask == -1 else {name for position, name in enumerate(names) if mask >> position & 1}
        model = cls.__new__(cls)
        model.__setstate__(
            {
                "__dict__": dict(zip(names, values, strict=True)),
                "__pydantic_fields_set__": fields_set,
                "__pydantic_extra__": None,
                "__pydantic_private__": None,
            }
        )
        return model

    @classmethod
    def trusted(cls, **values: Any) -> Self:
        """A model from values the pipeline computed itself, of the right types, given for *every* field:
        not validated, like ``model_construct``, at about a quarter of its cost (no defaults to look up).
        For per-event hot paths only; anything read from outside goes through ``model_validate``."""
        model = cls.__new__(cls)
        _set = object.__setattr__
        _set(model, "__dict__", values)
        _set(model, "__pydantic_fields_set__", set(values))
        _set(model, "__pydantic_extra__", None)
        _set(model, "__pydantic_private__", None)
        return model

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self._packed())


def _rebuild(cls: type[CompactPickleModel], packed: tuple[Any, ...]) -> CompactPickleModel:
    return cls._from_packed(packed)
