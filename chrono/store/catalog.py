"""Which part files make up a table: listing, readability and supersession.

A run's partition of a table is a directory of immutable Parquet parts. A part
written by ``RunWriter.replace_table`` (compaction, truncation, migration)
names the parts it supersedes in its footer metadata (``chrono.replaces``,
ours): readers ignore superseded parts from the moment the new part appears,
so a crash between writing it and deleting the old files shows no duplicates.
A part whose footer does not parse, or whose columns do not fit its table
(``schema_problem``), is skipped with one warning instead of failing every
query over the table.

Footers are read once per file version: ``part_info`` keeps an LRU cache keyed
by (path, table, inode, size, mtime in ns), so a repeated ``connect`` costs one
``stat`` per part. The inode is part of the key because a part name can come
back with the same size in the same mtime tick (a run deleted and written
again); parts themselves are never modified in place.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import NamedTuple

from ..columns import table_columns
from .layout import PART_RE, list_runs, table_dirs, validate_run_id

log = logging.getLogger("chrono.store")

# Footer metadata keys of a part file (written by chrono.store.writer).
SCHEMA_VERSION_KEY = b"chrono.schema_version"
TABLE_KEY = b"chrono.table"
REPLACES_KEY = b"chrono.replaces"

CACHE_PARTS = 1 << 17   # footers kept; a store with more live parts re-reads some (run chrono compact)


class PartInfo(NamedTuple):
    readable: bool                 # footer parses and the columns fit the table
    replaces: tuple[str, ...]      # names of the parts this one supersedes (same directory)
    columns: frozenset             # the file's column names


_UNREADABLE = PartInfo(False, (), frozenset())


def file_version(path: str) -> tuple | None:
    """(inode, size, mtime in ns) of a file, the cache key of its immutable content; None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def part_info(path: str, table: str) -> PartInfo:
    """Readability, superseded part names and column names of one part file of ``table``.

    A missing file is unreadable; so is one whose footer fails to parse or whose
    columns do not fit (logged once per file version at WARNING on ``chrono.store``).
    """
    version = file_version(path)
    return _UNREADABLE if version is None else _read_part_info(path, table, version)


@functools.lru_cache(maxsize=CACHE_PARTS)
def _read_part_info(path: str, table: str, version: tuple) -> PartInfo:
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(path)
        kv = md.metadata or {}
        problem = schema_problem(table, md.schema.to_arrow_schema(), kv)
        if problem:
            raise ValueError(problem)
        replaces = tuple(json.loads(kv[REPLACES_KEY])) if REPLACES_KEY in kv else ()
        if not all(isinstance(n, str) for n in replaces):
            raise ValueError("malformed chrono.replaces metadata")
        return PartInfo(True, replaces, _shared(frozenset(md.schema.names)))
    except Exception as e:
        log.warning("chrono: skipping unreadable part file %s (%s: %s)", path, type(e).__name__,
                    str(e)[:200])
        return _UNREADABLE


_COLUMN_SETS: dict[frozenset, frozenset] = {}


def _shared(columns: frozenset) -> frozenset:
    """One frozenset object per distinct column set (a handful per store), not one per cached part."""
    return _COLUMN_SETS.setdefault(columns, columns)


def schema_problem(table: str, schema, kv: dict) -> str | None:
    """Why a part file with this Arrow schema cannot be read as ``table`` (None if it can).

    Every current column must be present with its exact type (any string
    flavour for strings), or absent and have a default (older schema
    versions); a part labelled as another table is refused. Exact types keep
    the readers' CASTs infallible, so one foreign file cannot break a query.
    """
    import pyarrow as pa

    from ..schema import COLUMN_DEFAULTS, table_schema

    strings = (pa.string(), pa.large_string(), pa.string_view())
    labelled = kv.get(TABLE_KEY)
    if labelled is not None and labelled != table.encode():
        return f"part of table {labelled.decode(errors='replace')!r}, not {table!r}"
    defaults = COLUMN_DEFAULTS.get(table, {})
    for f in table_schema(table):
        idx = schema.get_field_index(f.name)
        if idx < 0:
            if f.name not in defaults:
                return f"column {f.name!r} missing"
            continue
        t = schema.field(idx).type
        if pa.types.is_dictionary(t):
            t = t.value_type
        ok = t in strings if f.type in strings else t == f.type
        if not ok:
            return f"column {f.name!r} is {t}, expected {f.type}"
    return None


def part_candidates(root, table: str, run: str | None = None) -> list[list[str]]:
    """Part-named files of ``table`` before any footer is read: one list per run (its partition,
    then the legacy location; sorted by name in each). Raises like ``part_files``."""
    table_columns(table)   # ValueError for an unknown table
    runs = [validate_run_id(run)] if run is not None else list_runs(root)
    out = []
    for r in runs:
        paths = []
        for d in table_dirs(root, table, r):
            try:
                names = sorted(n for n in os.listdir(d) if PART_RE.match(n))
            except OSError:
                continue
            paths.extend(str(d / n) for n in names)
        out.append(paths)
    return out


def part_files(root, table: str, run: str | None = None, infos: dict | None = None) -> list[str]:
    """Readable part files of ``table`` (one run or all), temporary and superseded parts excluded.

    A run's parts are read from its partition and, if any are left there, from
    the legacy location (a store written before the hive layout, or one whose
    ``chrono migrate`` was interrupted): a part is in exactly one place, since
    migration moves files with ``os.replace``. ``infos``: ``{path: PartInfo}`` judged already
    (``chrono.store.footers.part_infos``); other parts go through ``part_info``. Raises
    ``ValueError`` for an unknown table and ``StoreError`` for an invalid run id.
    """
    infos = infos or {}
    out = []
    for paths in part_candidates(root, table, run):
        good, superseded = [], set()
        for path in paths:
            info = infos.get(path) or part_info(path, table)
            if info.readable:
                good.append(path)
                superseded.update(info.replaces)
        out.extend(p for p in good if os.path.basename(p) not in superseded)
    return out


def part_columns(files: list[str], table: str, infos: dict | None = None) -> set[str]:
    """Union of the column names of these (readable) part files of ``table`` (``infos``: as in
    ``part_files``)."""
    infos = infos or {}
    cols: set[str] = set()
    for f in files:
        cols |= (infos.get(f) or part_info(f, table)).columns
    return cols
