"""Parquet footers rewritten field by field against pyarrow (review 5 of ``chrono.store.footers``).

A chrono-labelled routing part written by pyarrow (its ``ARROW:schema`` taken out, so only the
Parquet schema speaks) has its Thrift footer decoded, one annotation changed and encoded again.
DuckDB's ``duckdb_type`` follows the converted type where pyarrow follows the logical type, so on
main a logical type that disagrees (unsigned, DECIMAL, ENUM, UUID, BSON) was vouched readable while
pyarrow's ``catalog.part_info`` refuses it. Ground truth: ``catalog.part_info``.
"""
from __future__ import annotations

import copy
import struct

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chrono.schema import TABLES
from chrono.store import catalog
from chrono.store.footers import _footers, _vouch, part_infos

# Thrift compact protocol (Apache Thrift, "compact protocol" spec): a struct is [[field id, type, value]].
BOOL_TRUE, BOOL_FALSE, I8, I32, BINARY, LIST, STRUCT = 1, 2, 3, 5, 8, 9, 12


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = shift = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << shift
        shift += 7
        if not x & 0x80:
            return r, i


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _read(b: bytes, i: int, t: int):
    if t in (BOOL_TRUE, BOOL_FALSE):
        return t == BOOL_TRUE, i
    if t == I8:
        return b[i], i + 1
    if t in (4, I32, 6):
        v, i = _varint(b, i)
        return (v >> 1) ^ -(v & 1), i
    if t == 7:
        return struct.unpack_from("<d", b, i)[0], i + 8
    if t == BINARY:
        n, i = _varint(b, i)
        return bytes(b[i:i + n]), i + n
    if t == LIST:
        n, et, i = b[i] >> 4, b[i] & 15, i + 1
        if n == 15:
            n, i = _varint(b, i)
        items = []
        for _ in range(n):
            v, i = (b[i] == 1, i + 1) if et in (BOOL_TRUE, BOOL_FALSE) else _read(b, i, et)
            items.append(v)
        return (et, items), i
    if t == STRUCT:
        fields, last = [], 0
        while b[i]:
            h = b[i]
            i += 1
            fid = last + (h >> 4)
            if not h >> 4:
                v, i = _varint(b, i)
                fid = (v >> 1) ^ -(v & 1)
            v, i = _read(b, i, h & 15)
            fields.append([fid, h & 15, v])
            last = fid
        return fields, i + 1
    raise ValueError(f"thrift type {t}")


def _write(v, t: int) -> bytes:
    if t in (BOOL_TRUE, BOOL_FALSE):
        return b""
    if t == I8:
        return bytes([v])
    if t in (4, I32, 6):
        return _uvarint((v << 1) ^ (v >> 63))
    if t == 7:
        return struct.pack("<d", v)
    if t == BINARY:
        return _uvarint(len(v)) + v
    if t == LIST:
        et, items = v
        head = bytes([len(items) << 4 | et]) if len(items) < 15 else bytes([0xF0 | et]) + _uvarint(len(items))
        return head + b"".join(bytes([1 if x else 2]) if et in (BOOL_TRUE, BOOL_FALSE) else _write(x, et)
                               for x in items)
    out, last = bytearray(), 0
    for fid, ft, fv in v:
        ft = (BOOL_TRUE if fv else BOOL_FALSE) if ft in (BOOL_TRUE, BOOL_FALSE) else ft
        out += bytes([(fid - last) << 4 | ft]) if 0 < fid - last < 16 else bytes([ft]) + _uvarint(fid << 1)
        out += _write(fv, ft)
        last = fid
    return bytes(out + b"\0")


def _get(fields: list, fid: int):
    return next((f for f in fields if f[0] == fid), None)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[bytes, list]:
    """(data pages, decoded FileMetaData) of a pyarrow-written routing part: label kept, ARROW:schema out."""
    path = tmp_path_factory.mktemp("footer") / "part.parquet"
    row = {"run_id": ["a"], "step": [1], "mode": ["TRAIN"], "layer": [0], "expert": [1], "tokens": [3],
           "weight_sum": [None], "dropped": [0], "rank": [0]}
    pq.write_table(pa.table(row, schema=TABLES["routing"]).replace_schema_metadata({b"chrono.table": b"routing"}),
                   path)
    b = path.read_bytes()
    n = struct.unpack("<I", b[-8:-4])[0]
    fmd = _read(b[-8 - n:-8], 0, STRUCT)[0]
    kvs = _get(fmd, 5)[2][1]    # FileMetaData.key_value_metadata
    kvs[:] = [kv for kv in kvs if _get(kv, 1)[2] != b"ARROW:schema"]
    return b[:-8 - n], fmd


def _rewritten(labelled, tmp_path, change) -> str:
    pages, fmd = labelled
    fmd = copy.deepcopy(fmd)
    change(fmd)
    foot = _write(fmd, STRUCT)
    path = tmp_path / "forged.parquet"
    path.write_bytes(pages + foot + struct.pack("<I", len(foot)) + b"PAR1")
    return str(path)


def _annotate(column: bytes, converted: int | None = None, logical: list | None = None):
    """Set SchemaElement.converted_type (6) and/or logicalType (10) of ``column``."""
    def change(fmd):
        element = next(e for e in _get(fmd, 2)[2][1] if _get(e, 4)[2] == column)
        for fid, t, v in ((6, I32, converted), (10, STRUCT, logical)):
            if v is not None:
                element[:] = sorted([f for f in element if f[0] != fid] + [[fid, t, v]], key=lambda f: f[0])
    return change


def _integer(width: int, signed: bool) -> list:
    return [[10, STRUCT, [[1, I8, width], [2, BOOL_TRUE, signed]]]]   # LogicalType.INTEGER


# LogicalType union members (parquet.thrift): 4 ENUM, 5 DECIMAL, 10 INTEGER, 13 BSON, 14 UUID;
# ConvertedType: 17 INT_32.
REFUSED = {
    "string_enum": _annotate(b"mode", logical=[[4, STRUCT, []]]),
    "string_bson": _annotate(b"mode", logical=[[13, STRUCT, []]]),
    "string_uuid": _annotate(b"run_id", logical=[[14, STRUCT, []]]),
    "int64_unsigned": _annotate(b"step", logical=_integer(64, False)),
    "int32_converted_signed_logical_unsigned": _annotate(b"layer", converted=17, logical=_integer(32, False)),
    "int64_decimal": _annotate(b"tokens", logical=[[5, STRUCT, [[1, I32, 0], [2, I32, 18]]]]),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_annotations_pyarrow_reads_as_another_type_get_its_verdict(labelled, tmp_path, kind):
    path = _rewritten(labelled, tmp_path, REFUSED[kind])
    catalog._read_part_info.cache_clear()
    slow = catalog.part_info(path, "routing")
    assert not slow.readable
    assert part_infos(duckdb.connect(), [(path, "routing")])[path] == slow


def test_the_unchanged_footer_and_plain_writers_are_still_vouched_for(labelled, tmp_path):
    """The annotation check refuses only what it must: pyarrow's and DuckDB's own annotations of
    every chrono type (int16 of tokens.k, bool_ and float64 of decisions) pass. polars' parts are
    left to pyarrow either way (no label kept, an ARROW:schema with string_view strings)."""
    paths = [(_rewritten(labelled, tmp_path, lambda fmd: None), "routing")]
    for table in ("routing", "tokens", "decisions", "lifecycle"):
        empty = TABLES[table].empty_table().replace_schema_metadata({b"chrono.table": table.encode()})
        for writer in ("pyarrow", "polars", "duckdb"):
            path = tmp_path / f"{table}-{writer}.parquet"
            if writer == "pyarrow":
                pq.write_table(empty, path)
            elif writer == "polars":
                pl.from_arrow(empty).write_parquet(path)
            else:
                pq.write_table(empty, tmp_path / "src.parquet", store_schema=False)
                duckdb.execute(f"COPY (SELECT * FROM read_parquet('{tmp_path / 'src.parquet'}')) TO '{path}' "
                               f"(FORMAT parquet)")
            paths.append((str(path), table))
    schemas, kvs = _footers(duckdb.connect(), [p for p, _ in paths])
    fast = part_infos(duckdb.connect(), paths)
    for path, table in paths:
        assert catalog.part_info(path, table).readable, path
        assert fast[path] == catalog.part_info(path, table), path
        if "polars" not in path:
            assert _vouch(table, schemas[path], kvs.get(path, {})) == catalog.part_info(path, table), path


@pytest.mark.parametrize("change", ["one_short", "one_more"])
def test_a_column_orders_list_of_another_length_gets_pyarrows_verdict(labelled, tmp_path, change):
    """pyarrow: 'Malformed schema: not enough ColumnOrder values'; DuckDB reads such a footer."""
    def forge(fmd):
        orders = _get(fmd, 7)[2][1]                      # FileMetaData.column_orders
        orders.pop() if change == "one_short" else orders.append(copy.deepcopy(orders[0]))
    path = _rewritten(labelled, tmp_path, forge)
    catalog._read_part_info.cache_clear()
    slow = catalog.part_info(path, "routing")
    assert not slow.readable
    assert part_infos(duckdb.connect(), [(path, "routing")])[path] == slow
