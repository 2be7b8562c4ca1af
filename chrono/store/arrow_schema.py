"""The column types an ``ARROW:schema`` footer value restores, read without pyarrow.

pyarrow's Parquet writer stores the table's Arrow schema in the file's
key-value metadata (key ``ARROW:schema``: base64 of an Arrow IPC message
whose header is a ``Schema``), and pyarrow's reader restores from it types
the Parquet footer does not show (a duration or an extension type over
INT64, a dictionary, a large string). ``chrono.store.footers`` vouches for a
part without pyarrow only when this value names, for every column, one of
the plain types ``chrono.columns`` uses; this module reads just enough of it.

Format (Apache Arrow columnar format, "Serialization and Interprocess
Communication": encapsulated message; ``format/Message.fbs``: ``Message``
{version, header (union, ``Schema`` = 1), ...}; ``format/Schema.fbs``:
``Schema`` {endianness, fields, ...}, ``Field`` {name, nullable, type
(union), dictionary, children, custom_metadata}, ``Int`` {bitWidth,
is_signed}, ``FloatingPoint`` {precision}), laid out as FlatBuffers tables
(FlatBuffers "internals": little-endian; a table starts with a signed offset
back to its vtable of uint16 field offsets, 0 = absent = the default value;
offsets to tables, strings and vectors are uint32, relative to where they
are stored; a union takes two slots, its ubyte tag then its table).

Anything this reader does not expect (another message, a field that is
dictionary-encoded, nested or carries metadata such as an extension type's,
a type outside chrono's, a big-endian schema, a truncated or malformed
buffer) gives None for the field or the whole value: the caller then lets
pyarrow judge. Imports neither pyarrow nor numpy.
"""
from __future__ import annotations

import base64
import binascii
import functools
import struct

# Message.fbs: union MessageHeader { Schema, ... } (tag 1); MetadataVersion V4 = 3, V5 = 4.
_HEADER_SCHEMA = 1
_VERSIONS = (3, 4)
# Schema.fbs: union Type { Null, Int, FloatingPoint, Binary, Utf8, Bool, ... } (tags from 1).
_TYPE_INT, _TYPE_FLOAT, _TYPE_UTF8, _TYPE_BOOL = 2, 3, 5, 6
# Schema.fbs: enum Precision { HALF, SINGLE, DOUBLE }.
_FLOAT_NAMES = {1: "float32", 2: "float64"}
_CONTINUATION = b"\xff\xff\xff\xff"   # IPC encapsulated message: continuation marker, int32 length
_FORMATS = {f: struct.Struct(f) for f in ("<i", "<I", "<h", "<H", "<B")}


class _Malformed(Exception):
    """An offset or length that points outside the buffer."""


class _Buffer:
    """Bounds-checked little-endian reads of FlatBuffers tables, vectors and strings."""

    def __init__(self, data: bytes):
        self.data = data

    def _unpack(self, fmt: str, pos: int):
        f = _FORMATS[fmt]
        if pos < 0 or pos + f.size > len(self.data):
            raise _Malformed(pos)
        return f.unpack_from(self.data, pos)[0]

    def table(self, pos: int) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size) of the table at ``pos``."""
        vtable = pos - self._unpack("<i", pos)
        size = self._unpack("<H", vtable)
        if size < 4 or size % 2:
            raise _Malformed(vtable)
        return pos, vtable, size

    def slot(self, table: tuple[int, int, int], i: int) -> int | None:
        """Position of field ``i`` of a table, or None when absent (default value)."""
        pos, vtable, size = table
        if 4 + 2 * i + 2 > size:
            return None
        off = self._unpack("<H", vtable + 4 + 2 * i)
        return pos + off if off else None

    def scalar(self, table, i: int, fmt: str, default: int) -> int:
        p = self.slot(table, i)
        return default if p is None else self._unpack(fmt, p)

    def ref(self, table, i: int) -> int | None:
        """Target position of the offset stored in field ``i`` (table, string or vector), or None."""
        p = self.slot(table, i)
        return None if p is None else p + self._unpack("<I", p)

    def vector(self, pos: int) -> list[int]:
        """Positions of the tables an offset vector at ``pos`` points to."""
        n = self._unpack("<I", pos)
        if 4 + 4 * n > len(self.data) - pos:
            raise _Malformed(pos)
        return [pos + 4 + 4 * k + self._unpack("<I", pos + 4 + 4 * k) for k in range(n)]

    def string(self, pos: int) -> str:
        n = self._unpack("<I", pos)
        if pos + 4 + n > len(self.data):
            raise _Malformed(pos)
        return self.data[pos + 4: pos + 4 + n].decode("utf-8")


@functools.lru_cache(maxsize=256)
def field_types(value: bytes) -> tuple[tuple[str, str | None], ...] | None:
    """``((name, type), ...)`` of the top-level fields of an ``ARROW:schema`` footer value, in order.

    ``type`` is the ``chrono.columns`` name of a plain field's type (``"string"``
    for Utf8, ``"int16"``/``"int32"``/``"int64"`` for signed Int, ``"float32"``/
    ``"float64"`` for FloatingPoint, ``"bool_"`` for Bool) and None for any other
    type, or for a field that is dictionary-encoded, has children or carries
    custom metadata (an extension type's name lives there). None for the whole
    value when it is not base64 of a little-endian V4/V5 Schema message or is
    malformed. Never raises. Cached by value: the parts of one table written by
    one chrono version mostly store the same value.
    """
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError, TypeError):
        return None
    try:
        return _fields(_Buffer(_message(raw)))
    except (_Malformed, UnicodeDecodeError):
        return None


def _message(raw: bytes) -> bytes:
    """The flatbuffer of an encapsulated IPC message (with or without the continuation marker)."""
    start = 8 if raw[:4] == _CONTINUATION else 4
    if len(raw) < start:
        raise _Malformed(0)
    length = struct.unpack_from("<i", raw, start - 4)[0]
    if length <= 0 or start + length > len(raw):
        raise _Malformed(start)
    return raw[start: start + length]


def _fields(buf: _Buffer) -> tuple[tuple[str, str | None], ...] | None:
    message = buf.table(buf._unpack("<I", 0))
    if buf.scalar(message, 0, "<h", 0) not in _VERSIONS or buf.scalar(message, 1, "<B", 0) != _HEADER_SCHEMA:
        return None
    header = buf.ref(message, 2)
    if header is None:
        return None
    schema = buf.table(header)
    if buf.scalar(schema, 0, "<h", 0) != 0:        # Endianness.Little
        return None
    fields = buf.ref(schema, 1)
    return () if fields is None else tuple(_field(buf, buf.table(p)) for p in buf.vector(fields))


def _field(buf: _Buffer, field) -> tuple[str, str | None]:
    name_at = buf.ref(field, 0)
    name = "" if name_at is None else buf.string(name_at)
    plain = all(buf.slot(field, i) is None for i in (4, 6)) and _no_children(buf, field)
    tag = buf.scalar(field, 2, "<B", 0)
    type_at = buf.ref(field, 3)
    if not plain or type_at is None:
        return name, None
    t = buf.table(type_at)
    if tag == _TYPE_UTF8:
        return name, "string"
    if tag == _TYPE_BOOL:
        return name, "bool_"
    if tag == _TYPE_INT:
        width, signed = buf.scalar(t, 0, "<i", 0), buf.scalar(t, 1, "<B", 0)
        return name, f"int{width}" if signed and width in (16, 32, 64) else None
    if tag == _TYPE_FLOAT:
        return name, _FLOAT_NAMES.get(buf.scalar(t, 0, "<h", 0))
    return name, None


def _no_children(buf: _Buffer, field) -> bool:
    children = buf.ref(field, 5)
    return children is None or buf._unpack("<I", children) == 0
