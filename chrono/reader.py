"""Read side of the store: a sandboxed, read-only DuckDB connection and Polars frames.

``connect(root)`` returns an in-memory DuckDB connection with one view per
table over every readable part file under ``root`` (corrupt or truncated
parts are skipped with one warning each), plus ``runs`` built from the
manifests. After the views are created, DuckDB's file access is confined to
``root`` (``allowed_directories`` + ``enable_external_access=false``) and the
configuration is locked, so SQL typed by a user cannot read or write files
elsewhere. ``run_readonly_sql`` additionally refuses any statement that is not
a query.

Views are built from the part list at call time; ``refresh(con)`` rebuilds
them so a long-lived reader (dashboard, exporter) sees parts written since.
``connect(root, tables=...)`` builds only some views, with part footers read
by DuckDB (``chrono.store.footers``): over a store of sound parts it imports
neither pyarrow nor numpy, which is most of ``chrono runs``' start-up.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import duckdb

from .columns import COLUMN_DEFAULTS, COLUMNS, sql_columns
from .store import StoreError, list_runs, part_columns, part_files, run_manifest, store_note
from .store.catalog import CACHE_PARTS, file_version, part_candidates

# The ``runs`` view, one row per run from its manifest: (column, SQL type, SQL of the bound value).
# Built in DuckDB, not as an Arrow table: pyarrow arrays from Python objects import pandas,
# which was most of ``chrono runs``' start-up (issue 17).
RUNS_COLUMNS = (
    ("run_id", "VARCHAR", "?"), ("created_at", "TIMESTAMP_S", "make_timestamp(?::BIGINT * 1000000)"),
    ("updated_at", "TIMESTAMP_S", "make_timestamp(?::BIGINT * 1000000)"), ("schema_version", "INTEGER", "?"),
    ("n_layers", "INTEGER", "?"), ("n_experts", "INTEGER", "?"), ("top_k", "INTEGER", "?"),
    ("adapter", "VARCHAR", "?"), ("model", "VARCHAR", "?"), ("config", "VARCHAR", "?"),
    ("host", "VARCHAR", "?"), ("world_size", "INTEGER", "?"),
)

READ_ONLY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}


class QueryError(Exception):
    """A user's SQL was refused or failed; the message is one readable line."""


class ThreadsError(QueryError, ValueError):
    """A bad DuckDB thread count (``threads=`` / ``$CHRONO_DUCKDB_THREADS``); one readable line."""


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _view_sql(table: str, files: list[str], infos: dict | None = None) -> str:
    schema = sql_columns(table)
    if not files:
        cols = ", ".join(f"CAST(NULL AS {sql}) AS {name}" for name, sql in schema)
        return f"SELECT {cols} WHERE false"
    file_list = "[" + ", ".join(_sql_str(f) for f in files) + "]"
    defaults = COLUMN_DEFAULTS.get(table, {})
    present = part_columns(files, table, infos)
    # hive_partitioning=false: run_id comes from the column inside each file, never from the
    # run_id=<id> directory (DuckDB would auto-detect it and infer "2024" as a number).
    # union_by_name fills columns a part lacks (older schema) with NULL; coalesce to the default.
    # A column no part has at all (a store written only by an older version) is not in the
    # union, so it is spelled as its default constant.
    cols = []
    for name, sql in schema:
        d = defaults.get(name)
        if name not in present:
            value = "NULL" if d is None else repr(d)
            cols.append(f"CAST({value} AS {sql}) AS {name}")
        elif d is not None:
            cols.append(f"COALESCE(CAST({name} AS {sql}), {d!r}) AS {name}")
        else:
            cols.append(f"CAST({name} AS {sql}) AS {name}")
    return f"SELECT {', '.join(cols)} FROM read_parquet({file_list}, union_by_name=true, hive_partitioning=false)"


def runs_rows(root) -> list[tuple]:
    """One tuple per run, in ``RUNS_COLUMNS`` order (times as Unix seconds), from the manifests."""
    rows = []
    for r in list_runs(root):
        m = run_manifest(root, r)
        model = m.get("model") or {}
        epl = model.get("experts_per_layer") or {}
        n_exp = max((int(v) for v in epl.values()), default=None) if isinstance(epl, dict) else None
        layers = model.get("layers")
        rows.append((
            r,
            int(m["created_at"]) if m.get("created_at") else None,
            int(m["updated_at"]) if m.get("updated_at") else None,
            m.get("schema_version"),
            len(layers) if isinstance(layers, list) else (len(epl) or None),
            n_exp,
            model.get("top_k"),
            model.get("adapter"),
            json.dumps(model) if model else None,
            json.dumps(m.get("config")) if m.get("config") is not None else None,
            m.get("host"),
            m.get("world_size"),
        ))
    return rows


def _build_runs_view(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    rows = runs_rows(root)
    con.execute("CREATE OR REPLACE TABLE _runs ({})".format(", ".join(f"{c} {t}" for c, t, _ in RUNS_COLUMNS)))
    if rows:
        one = "(" + ", ".join(v for _, _, v in RUNS_COLUMNS) + ")"
        con.execute(f"INSERT INTO _runs VALUES {', '.join([one] * len(rows))}", [v for r in rows for v in r])
    con.execute("CREATE OR REPLACE VIEW runs AS SELECT * FROM _runs")


def part_has_invalid_rows(path: str, table: str) -> bool:
    """Whether a part of ``table`` holds a row the write API would refuse (``chrono.rules``).

    Parts are immutable, so each file version is scanned once (the columns the rules
    read) and the answer kept in an LRU cache keyed like the store's footer cache
    (``chrono.store.catalog.file_version``); a part that cannot be scanned counts as suspect.
    """
    version = file_version(path)
    return True if version is None else _scan_invalid(path, table, version)


@functools.lru_cache(maxsize=CACHE_PARTS)
def _scan_invalid(path: str, table: str, version: tuple) -> bool:
    import pyarrow.parquet as pq

    from .rules import invalid_mask
    from .schema import TABLES

    try:
        with pq.ParquetFile(path) as f:
            cols = [c for c in f.schema_arrow.names if c in TABLES[table].names and c != "run_id"
                    and not _stats_prove_valid(f.metadata, table, c)]
            t = f.read(columns=cols) if cols else None
        return t is not None and bool(invalid_mask(table, t)[0].any())
    except Exception:
        return True


def _stats_prove_valid(md, table: str, column: str) -> bool:
    """True when the footer's statistics alone show every value of an integer ``column`` valid
    (no NULLs where none may be, min/max inside its bounds): the column need not be read."""
    import pyarrow as pa

    from .rules import INT_MAX, bounds
    from .schema import TABLES

    field = TABLES[table].field(column)
    b = bounds(table, column)
    if not pa.types.is_integer(field.type) or (table == "signals" and column in ("name", "value")):
        return False
    lo, hi = b if b is not None else (-INT_MAX[field.type.bit_width] - 1, None)
    hi = INT_MAX[field.type.bit_width] if hi is None else hi
    idx = md.schema.names.index(column) if column in md.schema.names else -1
    if idx < 0:
        return False
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(idx).statistics
        if st is None or not st.has_min_max or st.null_count is None:
            if md.row_group(g).num_rows == 0:
                continue
            return False
        if (st.null_count and not field.nullable) or st.min < lo or st.max > hi:
            return False
    return True


def _build_views(con: duckdb.DuckDBPyConnection, root: Path, skip_invalid: bool = False,
                 tables: tuple | None = None) -> None:
    infos = None
    if tables is not None:   # a subset: footers read by DuckDB in one pass, pyarrow only where it must judge
        from .store.footers import part_infos

        infos = part_infos(con, [(p, t) for t in tables for paths in part_candidates(root, t) for p in paths])
    for table in (COLUMNS if tables is None else tables):
        files = part_files(root, table, infos=infos)
        sql = _view_sql(table, files, infos)
        if skip_invalid:   # rows the write API would refuse go to invalid_<table> instead
            from .rules import invalid_sql

            suspect = [f for f in files if part_has_invalid_rows(f, table)]
            bad, clean = invalid_sql(table), [f for f in files if f not in set(suspect)]
            filtered = f"SELECT * FROM ({_view_sql(table, suspect)}) WHERE NOT ({bad})"
            sql = f"{_view_sql(table, clean)} UNION ALL {filtered}" if clean and suspect else \
                (filtered if suspect else sql)
            con.execute(f"CREATE OR REPLACE VIEW invalid_{table} AS "
                        f"SELECT * FROM ({_view_sql(table, suspect)}) WHERE {bad}")
        con.execute(f"CREATE OR REPLACE VIEW {table} AS {sql}")
    _build_runs_view(con, root)


def duckdb_threads(threads=None) -> int | None:
    """Worker threads for a DuckDB connection: ``threads``, else ``$CHRONO_DUCKDB_THREADS``,
    else None (DuckDB's own default: every core of the machine). Raises ThreadsError (a ValueError)
    unless an int >= 1."""
    src = "threads"
    if threads is None:
        threads, src = os.environ.get("CHRONO_DUCKDB_THREADS") or None, "$CHRONO_DUCKDB_THREADS"
        if threads is None:
            return None
    try:
        n = int(threads)
    except (TypeError, ValueError):
        n = 0
    if isinstance(threads, bool) or n < 1 or (isinstance(threads, float) and threads != n):
        raise ThreadsError(f"{src} must be an integer >= 1 (DuckDB worker threads), got {threads!r}")
    return n


def _warn_if_not_a_store(root) -> None:
    """A UserWarning (``chrono.store.store_note``) when ``root`` looks mistyped: a missing
    directory, or the parent of a store. Reading it still gives an empty store."""
    import warnings

    note = store_note(root)
    if note is not None:
        warnings.warn(note, UserWarning, stacklevel=3)


def connect(root=None, sandbox: bool = True, skip_invalid: bool = False,
            threads: int | None = None, tables=None) -> duckdb.DuckDBPyConnection:
    """Read-only DuckDB connection with views ``runs routing tokens snapshots alerts
    decisions signals lifecycle`` over all runs under ``root``.

    A missing root is an empty store (every view empty, right columns), with a UserWarning
    saying so (also for a directory that is not a store but holds one: a mistyped root).
    ``skip_invalid``: leave rows the write API would refuse (``chrono.validate``:
    negative counts, unknown modes, non-finite metrics...; written by an older
    version or another tool) out of those views, and show them in views
    ``invalid_<table>`` instead (what the dashboard uses).
    ``threads``: DuckDB worker threads (default ``$CHRONO_DUCKDB_THREADS``, else DuckDB's
    default, one per core); ThreadsError (a ValueError) unless an int >= 1.
    ``tables``: build only these views (a name or names; and ``runs``; ValueError for an unknown
    name), for a
    one-shot reader: their parts' footers are then read by DuckDB in one pass
    (``chrono.store.footers``, same verdicts) instead of pyarrow's cached ``part_info``, so
    connecting to a store of sound parts imports neither pyarrow nor numpy (``chrono runs``).
    """
    from .store import default_root

    root = Path(root if root is not None else default_root()).absolute()
    n_threads = duckdb_threads(threads)
    _warn_if_not_a_store(root)
    if tables is not None:
        tables = tuple(dict.fromkeys((tables,) if isinstance(tables, str) else tables))   # "routing" = one
        for t in tables:
            sql_columns(t)   # ValueError naming the tables
    con = duckdb.connect(":memory:")
    if n_threads is not None:
        con.execute(f"SET threads TO {n_threads}")
    subset = "NULL" if tables is None else "[" + ", ".join(_sql_str(t) for t in tables) + "]"
    con.execute(f"CREATE TABLE _chrono_root AS SELECT {_sql_str(str(root))} AS root, "
                f"{bool(skip_invalid)} AS skip_invalid, CAST({subset} AS VARCHAR[]) AS tables")
    _build_views(con, root, skip_invalid, tables)
    if sandbox:
        allowed = str(root) + os.sep
        con.execute(f"SET allowed_directories = [{_sql_str(allowed)}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


def refresh(con: duckdb.DuckDBPyConnection) -> None:
    """Rebuild the views of a ``connect()`` connection to include newly written parts."""
    try:
        ((root, skip_invalid, tables),) = con.execute(
            "SELECT root, skip_invalid, tables FROM _chrono_root").fetchall()
    except duckdb.Error:
        raise ValueError("refresh() needs a connection made by chrono.connect()") from None
    _build_views(con, Path(root), skip_invalid, None if tables is None else tuple(tables))


def check_readonly(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise QueryError unless every statement in ``sql`` is a read-only query."""
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(_one_line(e)) from None
    if not stmts:
        raise QueryError("empty query")
    for st in stmts:
        kind = str(st.type).rsplit(".", 1)[-1]
        if kind not in READ_ONLY_TYPES:
            raise QueryError(f"only read-only queries are allowed (got a {kind} statement); "
                             f"the store is written by chrono itself")


def run_readonly_sql(con: duckdb.DuckDBPyConnection, sql: str, limit: int | None = None):
    """Run a user's read-only SQL; returns a DuckDB relation result as an Arrow table.

    ``limit`` caps the rows returned (the dashboard passes one; the CLI does not).
    """
    check_readonly(con, sql)
    try:
        return _run_statements(con, sql, limit)
    except duckdb.IOException as e:
        # A part listed when the views were built was removed since (compaction
        # superseded it): rebuild the views from the current parts and retry once.
        if not _is_vanished_file(e):
            raise QueryError(_one_line(e)) from None
        try:
            refresh(con)
            return _run_statements(con, sql, limit)
        except duckdb.Error as e2:
            raise QueryError(_one_line(e2)) from None
    except duckdb.Error as e:
        raise QueryError(_one_line(e)) from None


def _run_statements(con, sql: str, limit: int | None):
    stmts = con.extract_statements(sql)
    for st in stmts[:-1]:
        # fetch fully: DuckDB refuses the next statement while a result is pending,
        # and an unfetched result would poison a long-lived (dashboard) connection
        con.execute(st.query).fetchall()
    rel = con.sql(stmts[-1].query)
    if rel is None:
        import pyarrow as pa

        return pa.table({})
    if limit is not None:
        rel = rel.limit(limit)
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()


def _is_vanished_file(e: Exception) -> bool:
    msg = str(e)
    return "No files found" in msg or "No such file" in msg or "does not exist" in msg


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def read(root, table: str, run: str | None = None):
    """The same rows as the DuckDB view ``table``, as a ``polars.LazyFrame`` (a mistyped
    ``root`` warns as in ``connect``)."""
    import polars as pl

    from .schema import table_schema

    if table == "runs":   # before table_schema, which refuses it as an unknown table
        raise StoreError("use chrono.connect(root) for the runs view")
    schema = table_schema(table)
    pl_schema = pl.from_arrow(schema.empty_table()).schema
    _warn_if_not_a_store(root)
    files = part_files(root, table, run)
    if not files:
        return pl.LazyFrame(schema=pl_schema)
    lf = pl.scan_parquet(files, schema=pl_schema, missing_columns="insert", extra_columns="ignore",
                         hive_partitioning=False)
    fills = [pl.col(c).fill_null(v) for c, v in COLUMN_DEFAULTS.get(table, {}).items() if v is not None]
    return lf.with_columns(fills) if fills else lf
