"""Arrow schemas of the store: the product's public data API (DESIGN §3).

Every table is a directory of Parquet part files whose columns follow the
schema below. ``SCHEMA_VERSION`` is written into each run's manifest and into
each part file's metadata. Readers accept every older version: columns added
later are filled with their default (see ``COLUMN_DEFAULTS``) when missing.
"""
from __future__ import annotations

import pyarrow as pa

from .columns import COLUMN_DEFAULTS, COLUMNS, SQL_TYPES, table_columns

SCHEMA_VERSION = 2

# What changed in each version (readers accept all of them; `chrono migrate` rewrites
# older parts into the current version).
SCHEMA_HISTORY: dict[int, str] = {
    1: "first layout: routing has no `dropped` column (capacity drops were not recorded)",
    2: "routing.dropped (int64, default 0): (token, k) assignments routed to an expert but "
       "dropped by its capacity limit, not counted in `tokens`",
}

MODES = ("TRAIN", "EVAL", "INFER")
ALERT_TYPES = ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED")
ALERT_TRANSITIONS = ("raised", "cleared")
LIFECYCLE_EVENTS = ("spawn", "prune", "clone", "split", "merge", "grow")

GLOBAL_LAYER = -1  # the `layer` value of the whole-model row in snapshots

def _arrow_schema(table: str) -> pa.Schema:
    return pa.schema([pa.field(name, getattr(pa, t)(), nullable=nullable) for name, t, nullable in COLUMNS[table]])


# The columns themselves (names, types, nullability, comments) are spelled once, in chrono.columns.
ROUTING = _arrow_schema("routing")
TOKENS = _arrow_schema("tokens")
SNAPSHOTS = _arrow_schema("snapshots")
ALERTS = _arrow_schema("alerts")
DECISIONS = _arrow_schema("decisions")
SIGNALS = _arrow_schema("signals")
LIFECYCLE = _arrow_schema("lifecycle")

TABLES: dict[str, pa.Schema] = {
    "routing": ROUTING,
    "tokens": TOKENS,
    "snapshots": SNAPSHOTS,
    "alerts": ALERTS,
    "decisions": DECISIONS,
    "signals": SIGNALS,
    "lifecycle": LIFECYCLE,
}

# Columns each version added, per table: the schema of version v is the current schema
# minus the columns added after v (see ``schema_for``).
ADDED_IN: dict[int, dict[str, tuple[str, ...]]] = {
    2: {"routing": ("dropped",)},
}


def schema_for(table: str, version: int = SCHEMA_VERSION) -> pa.Schema:
    """The schema ``table`` had in ``version`` (used to read, test and migrate old stores)."""
    if version not in SCHEMA_HISTORY:
        raise ValueError(f"unknown schema version {version}; known: {sorted(SCHEMA_HISTORY)}")
    schema = table_schema(table)
    for v, added in ADDED_IN.items():
        if v > version:
            for name in added.get(table, ()):
                schema = schema.remove(schema.get_field_index(name))
    return schema


# The manifest is JSON; these are its keys (all present, some may be null).
MANIFEST_KEYS = (
    "schema_version",
    "run_id",
    "created_at",
    "updated_at",
    "model",  # {"layers": [...], "experts_per_layer": {layer: n}, "top_k": k, "adapter": ..., ...}
    "config",
    "host",
    "world_size",
)


def table_schema(table: str) -> pa.Schema:
    """The current schema of ``table``; a clear error for unknown names."""
    table_columns(table)   # ValueError naming the tables for an unknown name
    return TABLES[table]


def conform(table: str, batch: pa.Table) -> pa.Table:
    """Return ``batch`` with exactly the current columns of ``table``, in order.

    Missing columns (older schema versions) get their documented default;
    extra columns are dropped; types are cast to the current schema.
    """
    schema = table_schema(table)
    defaults = COLUMN_DEFAULTS.get(table, {})
    cols = []
    for field in schema:
        if field.name in batch.column_names:
            cols.append(batch.column(field.name).cast(field.type))
        elif field.name in defaults:
            cols.append(pa.array([defaults[field.name]] * batch.num_rows, type=field.type))
        else:
            raise ValueError(f"{table}: column {field.name!r} missing and has no default")
    return pa.Table.from_arrays(cols, schema=schema)


def duckdb_type(t: pa.DataType) -> str:
    """SQL type name used to build typed empty views (``chrono.columns.SQL_TYPES``; any string flavour is VARCHAR)."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    for name, sql in SQL_TYPES.items():
        if t == getattr(pa, name)():
            return sql
    raise TypeError(f"no SQL type for {t}")
