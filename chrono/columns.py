"""The store's columns without pyarrow: names, types, nullability and defaults of every table.

This is the one spelling of the tables' columns (DESIGN §3); ``chrono.schema``
builds the Arrow schemas from it, and readers that must not pay for importing
pyarrow (``chrono runs``: issue 17's start-up goal) build their SQL from it
directly. Types are named like pyarrow's type factories (``pa.int64()`` is
``"int64"``); ``SQL_TYPES`` gives each its DuckDB type.
"""
from __future__ import annotations

# DuckDB type of each column type; parts whose footer shows another type are not this table's.
SQL_TYPES = {"string": "VARCHAR", "int64": "BIGINT", "int32": "INTEGER", "int16": "SMALLINT",
             "float32": "FLOAT", "float64": "DOUBLE", "bool_": "BOOLEAN"}

# table -> ((column, type, nullable), ...) in file order
COLUMNS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "routing": (
        ("run_id", "string", False),
        ("step", "int64", False),
        ("mode", "string", False),
        ("layer", "int32", False),
        ("expert", "int32", False),
        ("tokens", "int64", False),        # (token, k) assignments actually dispatched to this expert
        ("weight_sum", "float32", True),   # summed gate weight of those assignments
        ("dropped", "int64", False),       # assignments routed here but dropped (capacity), not in tokens
        ("rank", "int32", False),
    ),
    "tokens": (
        ("run_id", "string", False),
        ("step", "int64", False),
        ("mode", "string", False),
        ("layer", "int32", False),
        ("batch_idx", "int32", False),
        ("position", "int32", False),
        ("k", "int16", False),
        ("expert", "int32", False),
        ("weight", "float32", True),
        ("token_id", "int64", True),
        ("rank", "int32", False),
    ),
    "snapshots": (
        ("run_id", "string", False),
        ("step", "int64", False),          # snapshot step = window end
        ("window_start", "int64", False),
        ("window_end", "int64", False),
        ("layer", "int32", False),         # -1 = global row
        ("n_experts", "int32", False),
        ("token_count", "int64", False),
        ("entropy", "float64", False),
        ("neff", "float64", False),
        ("top2_share", "float64", False),
        ("dead", "int32", False),
        ("nearly_dead", "int32", False),
        ("cv", "float64", False),
        ("max_violation", "float64", False),
        ("gini", "float64", False),
        ("jain", "float64", False),
        ("drop_fraction", "float64", False),
    ),
    "alerts": (
        ("run_id", "string", False),
        ("step", "int64", False),          # snapshot step of the transition
        ("layer", "int32", False),
        ("alert", "string", False),        # PRE_COLLAPSE | COLLAPSE_CONFIRMED
        ("transition", "string", False),   # raised | cleared
        ("consecutive", "int32", False),
        ("n_experts", "int32", False),
        ("token_count", "int64", False),
        ("neff", "float64", False),
        ("top2_share", "float64", False),
        ("dead", "int32", False),
    ),
    "decisions": (
        ("run_id", "string", False),
        ("step", "int64", False),
        ("layer", "int32", False),
        ("actuator", "string", False),
        ("debt", "float64", False),
        ("pressure", "float64", False),
        ("heat", "float64", False),
        ("forgetting", "float64", False),
        ("lens_scale", "float64", False),
        ("backoff", "float64", False),
        ("abstain", "bool_", False),
        ("reason", "string", False),
        ("neff", "float64", True),
        ("top2_share", "float64", True),
    ),
    "signals": (
        ("run_id", "string", False),
        ("step", "int64", False),
        ("name", "string", False),
        ("layer", "int32", True),
        ("value", "float64", True),
        ("rank", "int32", False),
    ),
    "lifecycle": (
        ("run_id", "string", False),
        ("step", "int64", False),
        ("layer", "int32", False),
        ("event", "string", False),        # spawn | prune | clone | split | merge | grow
        ("expert", "int32", False),        # the expert created / removed / changed
        ("source_expert", "int32", True),  # parent of clone/split, partner of merge
        ("n_experts_after", "int32", False),
        ("applied", "bool_", False),       # False = proposed by policy only
        ("reason", "string", False),
    ),
}

# Filled in for a column a part file lacks (written by an older schema version).
COLUMN_DEFAULTS: dict[str, dict[str, object]] = {
    "routing": {"dropped": 0, "rank": 0, "weight_sum": None},
    "tokens": {"rank": 0, "token_id": None, "weight": None},
    "signals": {"rank": 0, "layer": None},
}


def table_columns(table: str) -> tuple[tuple[str, str, bool], ...]:
    """The current ``(column, type, nullable)`` triples of ``table``; ValueError for unknown names."""
    try:
        return COLUMNS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; tables are: {', '.join(COLUMNS)}") from None


def sql_columns(table: str) -> tuple[tuple[str, str], ...]:
    """``(column, DuckDB type)`` of ``table``'s current columns; ValueError for unknown names."""
    return tuple((name, SQL_TYPES[t]) for name, t, _ in table_columns(table))
