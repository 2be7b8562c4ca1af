"""What a valid stored row is: one rule set for the write API's door and for readers.

Writers (``chrono.validate``) refuse a call that breaks a rule; readers meet rows
that break them anyway (a store written by an older version or another tool, a
hand-edited part) and report one line naming run, table, step and layer
(``InvalidRowsError``), found with one SQL query (``first_invalid``) or an Arrow
mask (``invalid_mask``). The rules (issue 23, ``docs/reliability.md``):

* steps, ranks, batch indices, positions, k, token ids, counts and the other
  integer columns in ``BOUNDS``: non-negative; counts (``tokens``, ``dropped``) at
  most ``MAX_COUNT`` = 2**53, the largest integer float64 holds exactly (metrics
  are computed in float64); layers >= 0 (the global row of snapshots, alerts and
  decisions is -1); a lifecycle row's expert >= -1 (a refused spawn has none);
* string columns with a vocabulary (``ENUMS``: mode, alert, transition, event) hold one of it;
* non-nullable columns hold no NULL;
* floats are finite, except gate weights (``routing.weight_sum``, ``tokens.weight``:
  a diverged router's weights are a fact; probes flag them with
  ``probes.nonfinite``) and signals named like a loss (``LOSS_NAME_RE``:
  ``loss``, ``val_loss``, ``x.distill_loss``), whose NaN/Inf records a divergence;
  ``accuracy`` and ``teacher_agreement`` lie in [0, 1] (DESIGN §9).

Readers do not check rows against the manifest (``chrono.declared``): runs written
before the write API checked grew experts without declaring them.
"""
from __future__ import annotations

import re

import numpy as np

from .schema import ALERT_TRANSITIONS, ALERT_TYPES, LIFECYCLE_EVENTS, MODES, TABLES

MAX_COUNT = 2 ** 53
LOSS_NAME_RE = re.compile(r"(\A|[._])loss\Z")     # signal names whose NaN/Inf is a kept fact
UNIT_SIGNALS = ("accuracy", "teacher_agreement")  # DESIGN §9: values in [0, 1]
INT_MAX = {8: 2 ** 7 - 1, 16: 2 ** 15 - 1, 32: 2 ** 31 - 1, 64: 2 ** 63 - 1}

BOUNDS: dict[str, tuple[int, int | None]] = {      # column -> (low, high); high None = the type's max
    "step": (0, None), "window_start": (0, None), "window_end": (0, None), "rank": (0, None),
    "layer": (0, None), "expert": (0, None), "source_expert": (0, None),
    "tokens": (0, MAX_COUNT), "dropped": (0, MAX_COUNT), "batch_idx": (0, None), "position": (0, None),
    "k": (0, None), "token_id": (0, None), "n_experts": (0, None), "token_count": (0, None),
    "dead": (0, None), "nearly_dead": (0, None), "consecutive": (0, None), "n_experts_after": (0, None),
}
ENUMS = {"mode": MODES, "alert": ALERT_TYPES, "transition": ALERT_TRANSITIONS, "event": LIFECYCLE_EVENTS}
NONFINITE_OK = {("routing", "weight_sum"), ("tokens", "weight"), ("signals", "value")}  # signals: by name
_GLOBAL_OK = ("snapshots", "alerts", "decisions")   # tables whose layer may be -1 (the global row)


class InvalidInputError(ValueError):
    """A write-API call refused at the door; nothing of it was written."""


class InvalidRowsError(ValueError):
    """Stored rows break the write API's rules (older version, another tool, a hand edit)."""

    def __init__(self, run, table, step, layer, problem, count):
        self.run, self.table, self.step, self.layer, self.problem, self.count = \
            run, table, step, layer, problem, count
        super().__init__(
            f"run {run!r}, table {table}, step {step}, layer {layer}: {problem} "
            f"({count} invalid row{'s' if count != 1 else ''} in this table, written by an older "
            f"version, another tool or a hand edit; see docs/reliability.md)")


def bounds(table: str, column: str) -> tuple[int, int | None] | None:
    """(low, high) of an integer column of ``table`` (high None: the type's max); None: no rule."""
    if column == "layer" and table in _GLOBAL_OK:
        return (-1, None)
    if column == "expert" and table == "lifecycle":
        return (-1, None)
    return BOUNDS.get(column)


def finite_required(table: str, column: str) -> bool:
    return (table, column) not in NONFINITE_OK


# ============================================================== readers
def _rules(table: str, columns=None) -> list[tuple]:
    """Structured rules ``(kind, column, arg)`` for the columns of ``table`` present in ``columns``."""
    import pyarrow as pa

    out = []
    for f in TABLES[table]:
        c = f.name
        if c == "run_id" or (columns is not None and c not in columns):
            continue
        if not f.nullable:
            out.append(("null", c, None))
        b = bounds(table, c)
        if b is not None and pa.types.is_integer(f.type):
            out.append(("lo", c, b[0]))
            if b[1] is not None:
                out.append(("hi", c, b[1]))
        if pa.types.is_floating(f.type) and finite_required(table, c):
            out.append(("finite", c, None))
        if c in ENUMS:
            out.append(("enum", c, ENUMS[c]))
    if table == "signals" and (columns is None or {"name", "value"} <= set(columns)):
        out += [("loss", "value", None), ("unit", "value", UNIT_SIGNALS)]
    return out


_LOSS_SQL = LOSS_NAME_RE.pattern.replace("\\A", "^").replace("\\Z", "$")


def _sql(kind: str, c: str, arg) -> tuple[str, str]:
    """(SQL condition true for an invalid row, SQL expression describing it)."""
    val = f"coalesce(CAST({c} AS VARCHAR), 'NULL')"
    if kind == "null":
        return f"{c} IS NULL", f"'{c} is NULL'"
    if kind in ("lo", "hi"):
        op, word = ("<", ">=") if kind == "lo" else (">", "<=")
        return f"{c} {op} {arg}", f"'{c} = ' || {val} || ' (must be {word} {arg})'"
    if kind == "finite":
        return f"NOT isfinite({c})", f"'{c} = ' || {val} || ' (must be finite)'"
    if kind == "enum":
        return (f"{c} NOT IN ({', '.join(repr(v) for v in arg)})",
                f"'{c} = ' || {val} || ' (not one of {', '.join(arg)})'")
    if kind == "loss":
        return (f"NOT isfinite(value) AND NOT regexp_matches(name, '{_LOSS_SQL}')",
                f"'value of ' || name || ' = ' || {val} || ' (must be finite)'")
    return (f"name IN ({', '.join(repr(v) for v in arg)}) AND (value < 0 OR value > 1)",
            f"'value of ' || name || ' = ' || {val} || ' (must be in [0, 1])'")


def invalid_sql(table: str) -> str:
    """SQL condition true for a row of view ``table`` that breaks a rule (``NOT (...)`` keeps the valid)."""
    return " OR ".join(f"coalesce({_sql(*r)[0]}, false)" for r in _rules(table)) or "false"


def first_invalid(con, table: str, run: str, view: str | None = None) -> InvalidRowsError | None:
    """The first row (by step, layer) of ``run`` in view ``table`` of a ``chrono.connect``
    connection that breaks a rule, as an error to raise or print; None when there is none.

    ``view``: read that view instead (``invalid_<table>`` of a ``skip_invalid`` connection).
    """
    case = " ".join(f"WHEN coalesce({c}, false) THEN {d}" for c, d in (_sql(*r) for r in _rules(table)))
    sql = (f"SELECT step, layer, CASE {case} END AS problem, count(*) OVER () AS n FROM {view or table} "
           f"WHERE run_id = ? AND ({invalid_sql(table)}) ORDER BY step NULLS FIRST, layer NULLS FIRST LIMIT 1")
    found = con.execute(sql, [run]).fetchall()   # fetch all: no pending result on a shared connection
    if not found:
        return None
    step, layer, problem, n = found[0]
    return InvalidRowsError(run, table, step, layer, problem, int(n))


def check_run(con, run: str, tables) -> None:
    """Raise ``InvalidRowsError`` for the first invalid row of ``run`` in any of ``tables``."""
    for t in tables:
        err = first_invalid(con, t, run)
        if err is not None:
            raise err


def _describe(kind: str, c: str, arg, v, name=None) -> str:
    if kind == "null":
        return f"{c} is NULL"
    if kind in ("lo", "hi"):
        return f"{c} = {v} (must be {'>=' if kind == 'lo' else '<='} {arg})"
    if kind == "finite":
        return f"{c} = {v} (must be finite)"
    if kind == "enum":
        return f"{c} = {v} (not one of {', '.join(arg)})"
    return f"value of {name} = {v} (must be {'finite' if kind == 'loss' else 'in [0, 1]'})"


def invalid_mask(table: str, t) -> tuple[np.ndarray, str | None]:
    """(bool mask of the rows of Arrow table ``t`` (columns of ``table``, any subset) that break a
    rule, ``"step S, layer L: <problem>"`` for the first of them or None)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    bad = np.zeros(t.num_rows, dtype=bool)
    first = None
    for kind, c, arg in _rules(table, set(t.column_names)):
        col = t.column(c)
        if kind == "null":
            m = col.is_null()
        elif kind == "lo":
            m = pc.less(col, arg)
        elif kind == "hi":
            m = pc.greater(col, arg)
        elif kind == "finite":
            m = pc.invert(pc.is_finite(col))
        elif kind == "enum":
            m = pc.invert(pc.is_in(col, value_set=pa.array(arg)))
        elif kind == "loss":
            m = pc.and_(pc.invert(pc.is_finite(col)),
                        pc.invert(pc.match_substring_regex(t.column("name"), _LOSS_SQL)))
        else:
            m = pc.and_(pc.is_in(t.column("name"), value_set=pa.array(arg)),
                        pc.or_(pc.less(col, 0.0), pc.greater(col, 1.0)))
        m = m.fill_null(False).to_numpy(zero_copy_only=False)
        if m.any():
            i = int(np.argmax(m))
            if first is None or i < first[0]:
                first = (i, _describe(kind, c, arg, t.column(c)[i].as_py(),
                                      t.column("name")[i].as_py() if "name" in t.column_names else None))
            bad |= m
    if first is None:
        return bad, None
    i, what = first
    step = t.column("step")[i].as_py() if "step" in t.column_names else "?"
    layer = t.column("layer")[i].as_py() if "layer" in t.column_names else "?"
    return bad, f"step {step}, layer {layer}: {what}"
