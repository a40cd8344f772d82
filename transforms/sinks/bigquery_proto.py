"""Rows as the Storage Write API takes them: one proto2 message class per table, rows encoded to bytes, and
back to JSON for dead letters. The wire format of the local writer (``bigquery_local``), pure and tested
without a server.
"""

from __future__ import annotations

import json
import zlib
from base64 import b64encode
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from apache_beam.utils.timestamp import Timestamp
from google.cloud.bigquery_storage_v1 import types
from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

from transforms.instants import EPOCH, epoch_micros, utc_datetime
from transforms.sinks.bigquery_tables import Column, TableSpec

_FieldType = descriptor_pb2.FieldDescriptorProto.Type
# How the Storage Write API expects each BigQuery type in a proto row.
_PROTO_TYPES: dict[str, int] = {
    "INT64": _FieldType.TYPE_INT64,
    "STRING": _FieldType.TYPE_STRING,
    "NUMERIC": _FieldType.TYPE_STRING,  # decimal text: exact, no float rounding
    "BIGNUMERIC": _FieldType.TYPE_STRING,
    "JSON": _FieldType.TYPE_STRING,
    "TIMESTAMP": _FieldType.TYPE_INT64,  # microseconds since the epoch
    "DATE": _FieldType.TYPE_INT32,  # days since the epoch
    "BOOL": _FieldType.TYPE_BOOL,
    "BYTES": _FieldType.TYPE_BYTES,
    "FLOAT64": _FieldType.TYPE_DOUBLE,
}


# --- rows as protobuf -----------------------------------------------------------------------------------------


def build_message_class(name: str, fields: Iterable[tuple[str, int]], package: str = "sink") -> type[message.Message]:
    """A proto2 message class named ``name`` with one optional field per (field name, proto type), in order.

    proto2 ``optional`` gives every field presence, so None is written as NULL; proto3 scalars would be
    written as 0 or "".
    """
    file_proto = descriptor_pb2.FileDescriptorProto(name=f"{name}.proto", package=package, syntax="proto2")
    message_proto = file_proto.message_type.add(name=name)
    for number, (field_name, field_type) in enumerate(fields, start=1):
        message_proto.field.add(
            name=field_name,
            number=number,
            type=field_type,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    # A private pool per class: the default pool refuses a second definition of the same name.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))


def proto_message_class(spec: TableSpec) -> type[message.Message]:
    """The message class of ``spec``'s rows: one optional field per column, in table order.

    REQUIRED columns are optional here too: the table, not the encoder, enforces them, and its row error is
    what the dead letter reports.
    """
    name = "".join(part.capitalize() for part in spec.table.split("_")) + "Row"
    return build_message_class(name, ((column.name, _PROTO_TYPES[column.type]) for column in spec.columns))


def writer_schema(message_class: type[message.Message]) -> types.ProtoSchema:
    descriptor = descriptor_pb2.DescriptorProto()
    message_class.DESCRIPTOR.CopyToProto(descriptor)
    return types.ProtoSchema(proto_descriptor=descriptor)


def timestamp_micros(value: datetime | Timestamp) -> int:
    if isinstance(value, Timestamp):
        return value.micros
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: a TIMESTAMP needs a UTC offset")
    return epoch_micros(value)


def _numeric_text(value: Any) -> str:
    if not isinstance(value, Decimal | int):
        raise TypeError(f"NUMERIC needs a Decimal or int, not {type(value).__name__}")
    # Fixed-point text: str(Decimal) may use an exponent ("1E+3"), which BigQuery reads differently.
    return format(value if isinstance(value, Decimal) else Decimal(value), "f")


def _date_days(value: date) -> int:
    return (value - EPOCH.date()).days


def _json_text(value: Any) -> Any:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "TIMESTAMP": timestamp_micros,
    "NUMERIC": _numeric_text,
    "BIGNUMERIC": _numeric_text,
    "DATE": _date_days,
    "JSON": _json_text,
}


def proto_value(column: Column, value: Any) -> Any:
    """One row value as the proto field of ``column`` expects it."""
    return _converted(column.name, _CONVERTERS.get(column.type), value)


def _converted(name: str, convert: Callable[[Any], Any] | None, value: Any) -> Any:
    if convert is None:
        return value
    try:
        return convert(value)
    except TypeError as error:
        raise TypeError(f"{name}: {error}") from error


class RowEncoder:
    """Serializes row dicts of rows.py as one table's proto; NULLs are left unset.

    The table's columns and converters are worked out once: looking them up per row by the table's spec
    hashed and compared the whole spec each time, 7 % of a backfill job's CPU (docs/benchmarks.md)."""

    def __init__(self, message_class: type[message.Message], spec: TableSpec) -> None:
        self._message_class = message_class
        self._table = spec.table
        self._names = frozenset(column.name for column in spec.columns)
        self._layout = tuple((column.name, _CONVERTERS.get(column.type)) for column in spec.columns)

    def __call__(self, row: dict[str, Any]) -> bytes:
        if not self._names.issuperset(row):
            raise ValueError(f"columns not in {self._table}: {sorted(set(row) - self._names)}")
        fields = {}
        for name, convert in self._layout:
            value = row.get(name)
            if value is not None:
                fields[name] = _converted(name, convert, value)
        return self._message_class(**fields).SerializeToString()


def encode_row(message_class: type[message.Message], spec: TableSpec, row: dict[str, Any]) -> bytes:
    """``row`` (a dict of rows.py) serialized as the table's proto; for one row (a hot path uses ``RowEncoder``)."""
    return RowEncoder(message_class, spec)(row)


def _json_value(column: Column, value: Any) -> Any:
    if column.type == "TIMESTAMP":
        return utc_datetime(value).isoformat()
    if column.type == "BYTES":
        return b64encode(value).decode("ascii")
    return value


def row_json(message_class: type[message.Message], spec: TableSpec, encoded: bytes) -> str:
    """A rejected row as readable JSON for its dead letter (timestamps ISO-8601, bytes base64)."""
    decoded = message_class.FromString(encoded)
    document = {
        column.name: _json_value(column, getattr(decoded, column.name)) if decoded.HasField(column.name) else None
        for column in spec.columns
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stream_of_row(encoded: bytes, num_shards: int) -> int:
    """The write stream (shard) of an encoded row: the same row lands on the same stream whichever worker
    encodes it. (The HTTP sink's ``shard_of_event`` shards event ids into batches: another purpose.)"""
    return zlib.crc32(encoded) % num_shards


MAX_REQUEST_BYTES = 9 * 1024 * 1024
"""Rows per AppendRows request stop short of this: the API refuses requests over 10 MB."""


def chunked(items: Iterable[bytes], size: int, max_bytes: int = MAX_REQUEST_BYTES) -> Iterator[list[bytes]]:
    """``items`` in lists of at most ``size`` items and ``max_bytes`` bytes (a larger item is a list of its own),
    read lazily: a shard's group may not fit in memory."""
    if size < 1:
        raise ValueError(f"chunk size must be positive, not {size}")
    chunk: list[bytes] = []
    chunk_bytes = 0
    for item in items:
        if chunk and chunk_bytes + len(item) > max_bytes:
            yield chunk
            chunk, chunk_bytes = [], 0
        chunk.append(item)
        chunk_bytes += len(item)
        if len(chunk) == size:
            yield chunk
            chunk, chunk_bytes = [], 0
    if chunk:
        yield chunk


def refusal_sentinel(spec: TableSpec) -> bytes:
    """A row ``spec``'s table always refuses: the empty message, which leaves every REQUIRED column NULL.

    A probe request ends with it, so the table refuses the whole request and writes nothing, while its
    ``row_errors`` still name every other row it would refuse.
    """
    if not any(column.required for column in spec.columns):
        raise ValueError(f"{spec.table} has no REQUIRED column: no row is sure to be refused, so it cannot be probed")
    return b""
