"""Vouching for part files from their footers with DuckDB, without importing pyarrow.

``chrono.store.catalog.part_info`` judges a part with pyarrow (footer parses,
columns fit the table, ``chrono.replaces``). Importing pyarrow (and numpy with
it) is most of a one-shot command's start-up (issue 17: ``chrono runs``), so
``part_infos`` reads the footers of many parts in three DuckDB queries
(``parquet_schema``, ``parquet_kv_metadata``, ``parquet_file_metadata``) and
*vouches* for the parts that certainly fit: a flat file whose every column of
the table is present with the Parquet physical type, DuckDB type and
annotations (converted and logical type) of its ``chrono.columns`` type, or
absent with a default; one column order per column, if any; no other table's
label; a well-formed
``chrono.replaces``; and, when the footer stores an Arrow schema (pyarrow
restores from it types Parquet does not show: a duration or an extension
type over INT64, a dictionary, a large string), a chrono label and an Arrow
schema naming the file's columns in order, each with exactly its
``chrono.columns`` type and every other one a plain type too
(``chrono.store.arrow_schema``). Every other part (a
footer DuckDB cannot read, a type that does not fit, nested columns, a
metadata key stored twice, an Arrow schema this reader does not expect or
one on a part without chrono's label) goes to ``part_info``, so the
verdicts, and the warnings for unreadable parts, are pyarrow's; it is
imported only then.

Imports neither pyarrow nor numpy.
"""
from __future__ import annotations

import json

import duckdb

from ..columns import COLUMN_DEFAULTS, SQL_TYPES, table_columns
from .arrow_schema import field_types
from .catalog import REPLACES_KEY, TABLE_KEY, PartInfo, _shared, part_info

# Parquet physical type of each chrono.columns type (pyarrow's writer, no annotation but strings').
PHYSICAL_TYPES = {"string": "BYTE_ARRAY", "int64": "INT64", "int32": "INT32", "int16": "INT32",
                  "float32": "FLOAT", "float64": "DOUBLE", "bool_": "BOOLEAN"}
# (converted type, DuckDB's rendering of the logical type) a column of each type may carry: what
# pyarrow's, polars' and DuckDB's writers put there. Any other annotation (a logical type that
# disagrees with the converted one: unsigned, DECIMAL, ENUM, UUID...) is left to pyarrow, which
# reads the logical type first. DuckDB 2.0 renders an IntType's bitWidth as a character.
_INT = "IntType(bitWidth={}, isSigned=1)"
ANNOTATIONS = {"string": {("UTF8", None), ("UTF8", "StringType()")},
               "int16": {("INT_16", None), ("INT_16", _INT.format(chr(16)))},
               "int32": {(None, None), ("INT_32", None), ("INT_32", _INT.format(chr(32)))},
               "int64": {(None, None), ("INT_64", None), ("INT_64", _INT.format(chr(64)))},
               "float32": {(None, None)}, "float64": {(None, None)}, "bool_": {(None, None)}}
ARROW_SCHEMA_KEY = b"ARROW:schema"
# Set in a footer's {key: value} (never a bytes key) to the length of FileMetaData.column_orders when
# the footer has one: pyarrow refuses a footer whose list does not give one order per column.
COLUMN_ORDERS = "column_orders"
# Set in a footer's {key: value} when a key occurs twice: pyarrow's writer adds its ARROW:schema to
# one already in the schema metadata, and which of the two a reader takes is not ours to guess.
DUPLICATE_KEYS = None

_SCHEMA_SQL = ("SELECT file_name, name, type, repetition_type, num_children, converted_type, duckdb_type, logical_type "
               "FROM parquet_schema({})")
_KV_SQL = "SELECT file_name, key, value FROM parquet_kv_metadata({})"
_ORDERS_SQL = "SELECT file_name, len(column_orders) FROM parquet_file_metadata({}) WHERE column_orders IS NOT NULL"


def part_infos(con: duckdb.DuckDBPyConnection, parts: list[tuple[str, str]]) -> dict[str, PartInfo]:
    """``{path: PartInfo}`` for ``(path, table)`` pairs: vouched from DuckDB's footer reading, or
    ``catalog.part_info``'s (pyarrow) verdict for a part it cannot vouch for. Same verdicts as
    ``part_info``; not cached (meant for one-shot readers)."""
    schemas, kvs = _footers(con, [p for p, _ in parts])
    out = {}
    for path, table in parts:
        info = _vouch(table, schemas.get(path), kvs.get(path, {}))
        out[path] = info if info is not None else part_info(path, table)
    return out


def _footers(con, paths: list[str]) -> tuple[dict, dict]:
    """({path: [schema rows]}, {path: {key: value}}) of the footers DuckDB reads: one query each for
    all paths, or, when some footer breaks the batch, one per path (that path is then left out)."""
    schemas: dict[str, list] = {}
    kvs: dict[str, dict] = {}
    if not paths:
        return schemas, kvs
    try:
        _read(con, paths, schemas, kvs)
        return schemas, kvs
    except duckdb.Error:
        schemas.clear()
        kvs.clear()
    for p in paths:
        one_s: dict[str, list] = {}
        one_kv: dict[str, dict] = {}
        try:
            _read(con, [p], one_s, one_kv)
        except duckdb.Error:
            continue
        schemas.update(one_s)
        kvs.update(one_kv)
    return schemas, kvs


def _read(con, paths: list[str], schemas: dict, kvs: dict) -> None:
    files = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
    for row in con.execute(_SCHEMA_SQL.format(files)).fetchall():
        schemas.setdefault(row[0], []).append(row[1:])
    for name, key, value in con.execute(_KV_SQL.format(files)).fetchall():
        kv = kvs.setdefault(name, {})
        if bytes(key) in kv:
            kv[DUPLICATE_KEYS] = True
        kv[bytes(key)] = bytes(value)
    for name, orders in con.execute(_ORDERS_SQL.format(files)).fetchall():
        kvs.setdefault(name, {})[COLUMN_ORDERS] = orders


def _vouch(table: str, rows: list | None, kv: dict) -> PartInfo | None:
    """A readable PartInfo when the footer certainly fits ``table``; None when pyarrow must judge."""
    if not rows or DUPLICATE_KEYS in kv:
        return None
    groups = [r for r in rows if r[1] is None]          # group nodes: only the root in a flat file
    leaves = {r[0]: r for r in rows if r[1] is not None}
    if len(groups) != 1 or groups[0][3] != len(rows) - 1 or len(leaves) != len(rows) - 1:
        return None                                      # nested or duplicate columns
    if kv.get(COLUMN_ORDERS, len(leaves)) != len(leaves):
        return None
    labelled = kv.get(TABLE_KEY)
    if (labelled is not None and labelled != table.encode()) or (labelled is None and ARROW_SCHEMA_KEY in kv):
        return None
    arrow_types = _arrow_types(kv, list(leaves))
    if arrow_types is None:
        return None
    defaults = COLUMN_DEFAULTS.get(table, {})
    for name, t, _ in table_columns(table):
        r = leaves.get(name)
        if r is None:
            if name not in defaults:
                return None
            continue
        _, physical, repetition, _, converted, sql, logical = r
        if physical != PHYSICAL_TYPES[t] or sql != SQL_TYPES[t] or repetition == "REPEATED" \
                or (converted, logical) not in ANNOTATIONS[t] or arrow_types.get(name, t) != t:
            return None
    replaces: tuple = ()
    if REPLACES_KEY in kv:
        try:
            replaces = tuple(json.loads(kv[REPLACES_KEY]))
        except (ValueError, TypeError, RecursionError):   # RecursionError: arrays nested too deep
            return None
        if not all(isinstance(n, str) for n in replaces):
            return None
    return PartInfo(True, replaces, _shared(frozenset(leaves)))


def _arrow_types(kv: dict, names: list[str]) -> dict | None:
    """``{column: chrono.columns type}`` from the footer's Arrow schema (``{}`` when it stores none);
    None when that schema cannot be read, does not name ``names``, the file's columns, in order
    (pyarrow applies it by position), or gives any field, a column of no table included, a type
    ``field_types`` does not read (pyarrow may refuse the whole schema for it)."""
    value = kv.get(ARROW_SCHEMA_KEY)
    if value is None:
        return {}
    fields = field_types(value)
    if fields is None or [n for n, _ in fields] != names or any(t is None for _, t in fields):
        return None
    return dict(fields)
