"""Arrow schemas of the store: the product's public data API (DESIGN §3).

Every table is a directory of Parquet part files whose columns follow the
schema below. ``SCHEMA_VERSION`` is written into each run's manifest and into
each part file's metadata. Readers accept every older version: columns added
later are filled with their default (see ``COLUMN_DEFAULTS``) when missing.
"""
from __future__ import annotations

import pyarrow as pa

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

ROUTING = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("expert", pa.int32(), nullable=False),
        # (token, k) assignments actually dispatched to this expert
        pa.field("tokens", pa.int64(), nullable=False),
        # summed gate weight of those assignments
        pa.field("weight_sum", pa.float32(), nullable=True),
        # assignments routed to this expert but dropped (capacity), not in `tokens`
        pa.field("dropped", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)

TOKENS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("batch_idx", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("k", pa.int16(), nullable=False),
        pa.field("expert", pa.int32(), nullable=False),
        pa.field("weight", pa.float32(), nullable=True),
        pa.field("token_id", pa.int64(), nullable=True),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)

SNAPSHOTS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),  # snapshot step = window end
        pa.field("window_start", pa.int64(), nullable=False),
        pa.field("window_end", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),  # -1 = global row
        pa.field("n_experts", pa.int32(), nullable=False),
        pa.field("token_count", pa.int64(), nullable=False),
        pa.field("entropy", pa.float64(), nullable=False),
        pa.field("neff", pa.float64(), nullable=False),
        pa.field("top2_share", pa.float64(), nullable=False),
        pa.field("dead", pa.int32(), nullable=False),
        pa.field("nearly_dead", pa.int32(), nullable=False),
        pa.field("cv", pa.float64(), nullable=False),
        pa.field("max_violation", pa.float64(), nullable=False),
        pa.field("gini", pa.float64(), nullable=False),
        pa.field("jain", pa.float64(), nullable=False),
        pa.field("drop_fraction", pa.float64(), nullable=False),
    ]
)

ALERTS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),  # snapshot step of the transition
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("alert", pa.string(), nullable=False),  # PRE_COLLAPSE | COLLAPSE_CONFIRMED
        pa.field("transition", pa.string(), nullable=False),  # raised | cleared
        pa.field("consecutive", pa.int32(), nullable=False),
        pa.field("n_experts", pa.int32(), nullable=False),
        pa.field("token_count", pa.int64(), nullable=False),
        pa.field("neff", pa.float64(), nullable=False),
        pa.field("top2_share", pa.float64(), nullable=False),
        pa.field("dead", pa.int32(), nullable=False),
    ]
)

DECISIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("actuator", pa.string(), nullable=False),
        pa.field("debt", pa.float64(), nullable=False),
        pa.field("pressure", pa.float64(), nullable=False),
        pa.field("heat", pa.float64(), nullable=False),
        pa.field("forgetting", pa.float64(), nullable=False),
        pa.field("lens_scale", pa.float64(), nullable=False),
        pa.field("backoff", pa.float64(), nullable=False),
        pa.field("abstain", pa.bool_(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("neff", pa.float64(), nullable=True),
        pa.field("top2_share", pa.float64(), nullable=True),
    ]
)

SIGNALS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=True),
        pa.field("value", pa.float64(), nullable=True),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)

LIFECYCLE = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("event", pa.string(), nullable=False),  # spawn | prune | clone | split | merge | grow
        pa.field("expert", pa.int32(), nullable=False),  # the expert created / removed / changed
        pa.field("source_expert", pa.int32(), nullable=True),  # parent of clone/split, partner of merge
        pa.field("n_experts_after", pa.int32(), nullable=False),
        pa.field("applied", pa.bool_(), nullable=False),  # False = proposed by policy only
        pa.field("reason", pa.string(), nullable=False),
    ]
)

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


# Filled in for a column a part file lacks (written by an older schema version).
COLUMN_DEFAULTS: dict[str, dict[str, object]] = {
    "routing": {"dropped": 0, "rank": 0, "weight_sum": None},
    "tokens": {"rank": 0, "token_id": None, "weight": None},
    "signals": {"rank": 0, "layer": None},
}

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
    try:
        return TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; tables are: {', '.join(TABLES)}") from None


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
    """SQL type name used to build typed empty views."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "VARCHAR"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int16(t):
        return "SMALLINT"
    if pa.types.is_float32(t):
        return "FLOAT"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    raise TypeError(f"no SQL type for {t}")
