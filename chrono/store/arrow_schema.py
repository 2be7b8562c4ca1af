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
_FORMATS = {f: struct.Struct(f) for f in ("<i", "<I", "<h", "<H", "<B", "<q")}
_WIDTHS = {1: "<B", 2: "<H", 4: "<I", 8: "<q"}
# Field widths by slot (0: an offset) of the tables read (Message.fbs, Schema.fbs).
_MESSAGE = (2, 1, 0, 8, 0)           # version, header_type, header, bodyLength, custom_metadata
_SCHEMA = (2, 0, 0, 0)               # endianness, fields, custom_metadata, features
_FIELD = (0, 1, 1, 0, 0, 0, 0)       # name, nullable, type_type, type, dictionary, children, custom_metadata
_KEY_VALUE = (0, 0)                  # key, value
_TYPE_SLOTS = {2: (4, 1), 3: (2,), 5: (), 6: ()}   # Int {bitWidth, is_signed}, FloatingPoint, Utf8, Bool


class _Malformed(Exception):
    """An offset or length that points outside the buffer."""


class _Buffer:
    """Bounds- and alignment-checked little-endian reads of FlatBuffers tables, vectors and strings.

    As strict as the FlatBuffers verifier pyarrow runs on the message (scalars aligned to their
    size, offsets non-zero and below 2**31, vtables in the buffer, strings NUL-terminated), so a
    value this reader accepts is one pyarrow does not refuse as "Invalid flatbuffers message".
    """

    def __init__(self, data: bytes):
        self.data = data

    def _unpack(self, fmt: str, pos: int):
        f = _FORMATS[fmt]
        if pos < 0 or pos % f.size or pos + f.size > len(self.data):
            raise _Malformed(pos)
        return f.unpack_from(self.data, pos)[0]

    def table(self, pos: int, sizes: tuple[int, ...] = ()) -> tuple[int, int, int]:
        """(table position, vtable position, vtable size) of the table at ``pos``, whose fields
        are ``sizes`` bytes wide (0: an offset); present fields are bounds- and alignment-checked,
        and a field beyond ``sizes`` (unknown to this reader) is refused."""
        vtable = pos - self._unpack("<i", pos)
        size = self._unpack("<H", vtable)
        if size < 4 or size % 2 or vtable + size > len(self.data) \
                or pos + self._unpack("<H", vtable + 2) > len(self.data):
            raise _Malformed(vtable)
        t = pos, vtable, size
        for i in range((size - 4) // 2):
            p = self.slot(t, i)
            if p is None:
                continue
            if i >= len(sizes):
                raise _Malformed(p)
            if sizes[i]:
                self._unpack(_WIDTHS[sizes[i]], p)
            else:
                self.ref(t, i)
        return t

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
        return None if p is None else self._offset(p)

    def _offset(self, p: int) -> int:
        off = self._unpack("<I", p)
        if off == 0 or off >= 1 << 31 or p + off >= len(self.data):
            raise _Malformed(p)
        return p + off

    def vector(self, pos: int) -> list[int]:
        """Positions of the tables an offset vector at ``pos`` points to."""
        n = self._unpack("<I", pos)
        if 4 + 4 * n > len(self.data) - pos:
            raise _Malformed(pos)
        return [self._offset(pos + 4 + 4 * k) for k in range(n)]

    def string(self, pos: int) -> str:
        n = self._unpack("<I", pos)
        if pos + 4 + n >= len(self.data) or self.data[pos + 4 + n] != 0:
            raise _Malformed(pos)
        return self.data[pos + 4: pos + 4 + n].decode("utf-8")


def field_types(value: bytes) -> tuple[tuple[str, str | None], ...] | None:
    """``((name, type), ...)`` of the top-level fields of an ``ARROW:schema`` footer value, in order.

    ``type`` is the ``chrono.columns`` name of a plain field's type (``"string"``
    for Utf8, ``"int16"``/``"int32"``/``"int64"`` for signed Int, ``"float32"``/
    ``"float64"`` for FloatingPoint, ``"bool_"`` for Bool) and None for any other
    type, or for a field that is dictionary-encoded, has children or carries
    custom metadata (an extension type's name lives there). None for the whole
    value when it is not base64 (bytes, str or a bytes-like object) of a
    little-endian V4/V5 Schema message without body or message metadata, or is
    malformed. Only what this reader interprets is verified: a field typed None
    may hold a dictionary, children or metadata pyarrow refuses the whole value
    for, so a caller vouches for a value only when every field is typed. Never
    raises. Cached by value: the parts of one table written by one chrono version
    mostly store the same value.
    """
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    try:
        return _cached_field_types(value)
    except TypeError:         # unhashable: not a footer value
        return None


@functools.lru_cache(maxsize=256)
def _cached_field_types(value) -> tuple[tuple[str, str | None], ...] | None:
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
    message = buf.table(buf._unpack("<I", 0), _MESSAGE)
    if buf.scalar(message, 0, "<h", 0) not in _VERSIONS or buf.scalar(message, 1, "<B", 0) != _HEADER_SCHEMA \
            or buf.scalar(message, 3, "<q", 0) != 0 or buf.slot(message, 4) is not None:
        return None                                  # another message, a body or message metadata
    header = buf.ref(message, 2)
    if header is None:
        return None
    schema = buf.table(header, _SCHEMA)
    if buf.scalar(schema, 0, "<h", 0) != 0 or buf.slot(schema, 3) is not None:   # Endianness.Little, no features
        return None
    metadata = buf.ref(schema, 2)
    if metadata is not None:                         # verified, not read: pyarrow restores it, chrono does not use it
        for kv in buf.vector(metadata):
            kv = buf.table(kv, _KEY_VALUE)
            for i in (0, 1):
                at = buf.ref(kv, i)
                if at is None:                       # pyarrow: "Unexpected null field custom_metadata.key"
                    raise _Malformed(kv[0])
                buf.string(at)
    fields = buf.ref(schema, 1)
    if fields is None:
        return None                                  # pyarrow: "Schema.fields" is null
    return tuple(_field(buf, buf.table(p, _FIELD)) for p in buf.vector(fields))


def _field(buf: _Buffer, field) -> tuple[str, str | None]:
    name_at = buf.ref(field, 0)
    name = "" if name_at is None else buf.string(name_at)
    plain = all(buf.slot(field, i) is None for i in (4, 6)) and _no_children(buf, field)
    tag = buf.scalar(field, 2, "<B", 0)
    type_at = buf.ref(field, 3)
    if not plain or type_at is None or tag not in _TYPE_SLOTS:
        return name, None
    t = buf.table(type_at, _TYPE_SLOTS[tag])
    if tag == _TYPE_UTF8:
        return name, "string"
    if tag == _TYPE_BOOL:
        return name, "bool_"
    if tag == _TYPE_INT:
        width, signed = buf.scalar(t, 0, "<i", 0), buf.scalar(t, 1, "<B", 0)
        return name, f"int{width}" if signed and width in (16, 32, 64) else None
    return name, _FLOAT_NAMES.get(buf.scalar(t, 0, "<h", 0))


def _no_children(buf: _Buffer, field) -> bool:
    children = buf.ref(field, 5)
    return children is None or buf._unpack("<I", children) == 0
