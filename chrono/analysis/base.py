"""What every routing analysis shares: the result type, step ranges, the run's
expert counts, and the checks that a run holds the table an analysis needs.

Analyses read a ``chrono.connect(root)`` DuckDB connection (the store's views)
and return an :class:`AnalysisResult`; nothing here imports torch.

Token identity. A per-token row is one (token, top-k slot) at one layer. The
same token at another layer or slot has the same *token key*
``(mode, rank, step, batch_idx, position)``. The probes keep all top-k rows of a
sampled token at a layer together (adjacent, slots in order); whether the same
token is also sampled at another layer depends on the sampling rate (with
``tokens < 1`` the sampler picks positions per router call; see docs/analysis.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from chrono.schema import MODES


class AnalysisError(ValueError):
    """The run cannot answer this analysis (missing table, bad range, ...); one readable line."""


# columns that identify one token within one layer (DESIGN §3 tokens table)
TOKEN_KEY = ("mode", "rank", "step", "batch_idx", "position")


@dataclass
class AnalysisResult:
    """One analysis over one run.

    ``table`` holds the rows (one row per layer, expert pair, ... as each analysis
    documents), ``summary`` a few run-wide numbers (JSON-serialisable),
    ``needs`` the store table(s) it read, ``notes`` caveats to show the user.
    """

    kind: str
    run: str
    needs: str
    table: pa.Table
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: tuple[int | None, int | None] = (None, None)

    def to_json(self) -> dict:
        return {"kind": self.kind, "run": self.run, "needs": self.needs,
                "steps": {"start": self.steps[0], "stop": self.steps[1]},
                "summary": self.summary, "notes": self.notes, "rows": self.table.to_pylist()}


@dataclass(frozen=True)
class Scope:
    """Which rows of a run an analysis reads.

    ``steps`` is a half-open range ``[start, stop)`` (either end None = open),
    ``layer`` one layer or None (all), ``mode`` one of TRAIN/EVAL/INFER or None (all).
    """

    run: str
    steps: tuple[int | None, int | None] = (None, None)
    layer: int | None = None
    mode: str | None = None

    def __post_init__(self):
        lo, hi = self.steps
        if lo is not None and hi is not None and hi <= lo:
            raise AnalysisError(f"empty step range {lo}:{hi} (the range is start:stop, stop excluded)")
        if self.mode is not None and self.mode not in MODES:
            raise AnalysisError(f"unknown mode {self.mode!r}; modes are {', '.join(MODES)}")

    def where(self, alias: str = "") -> str:
        """SQL condition selecting this scope; binds $run, $lo, $hi, $layer, $mode."""
        p = f"{alias}." if alias else ""
        conds = [f"{p}run_id = $run", f"{p}step >= $lo", f"{p}step < $hi"]
        if self.layer is not None:
            conds.append(f"{p}layer = $layer")
        if self.mode is not None:
            conds.append(f"{p}mode = $mode")
        return " AND ".join(conds)

    def params(self, **extra) -> dict:
        lo, hi = self.steps
        p = {"run": self.run, "lo": -(2 ** 63) if lo is None else int(lo),
             "hi": 2 ** 63 - 1 if hi is None else int(hi)}
        if self.layer is not None:
            p["layer"] = int(self.layer)
        if self.mode is not None:
            p["mode"] = self.mode
        p.update(extra)
        return p

    def with_steps(self, steps) -> "Scope":
        return Scope(self.run, steps, self.layer, self.mode)

    def describe(self) -> str:
        lo, hi = self.steps
        rng = "all steps" if lo is None and hi is None else \
            f"steps {'' if lo is None else lo}:{'' if hi is None else hi}"
        extra = "" if self.layer is None else f", layer {self.layer}"
        extra += "" if self.mode is None else f", mode {self.mode}"
        return rng + extra


def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """``"A:B"`` -> (A, B), half-open; ``"A:"``, ``":B"``, ``""``/None -> open ends.

    Raises AnalysisError on anything else (a single number means ``A:A+1``).
    """
    if text is None or text.strip() in ("", ":"):
        return (None, None)
    s = text.strip()
    try:
        if ":" not in s:
            a = int(s)
            return (a, a + 1)
        a, b = s.split(":", 1)
        lo = int(a) if a.strip() else None
        hi = int(b) if b.strip() else None
    except ValueError:
        raise AnalysisError(f"bad step range {text!r}: use START:STOP (stop excluded), "
                            f"e.g. 0:1000, 500: or :200") from None
    if lo is not None and hi is not None and hi <= lo:
        raise AnalysisError(f"empty step range {text!r} (stop must be greater than start)")
    return (lo, hi)


KEY_RANGE_SQL = """
SELECT min(step), max(step), min(batch_idx), max(batch_idx), min(position), max(position),
       min(rank), max(rank), count(DISTINCT mode) FROM tokens WHERE {where}
"""


def token_key_sql(con, scope: "Scope") -> tuple[str, bool]:
    """A SQL expression identifying a token within a layer, over the tokens rows in ``scope``.

    When the ranges of (step, batch_idx, position, rank, mode) in scope pack into one
    BIGINT (their product < 2**62), the expression is that exact mixed-radix number (one
    integer key: grouping and joining on it is several times faster); otherwise it is the
    5-column ``TOKEN_KEY`` as a row value. Either way equal keys <=> the same token.
    Returns (expression, packed).
    """
    ((s0, s1, b0, b1, p0, p1, r0, r1, modes),) = con.execute(
        KEY_RANGE_SQL.format(where=scope.where()), scope.params()).fetchall()
    if s0 is None:
        return "(" + ", ".join(TOKEN_KEY) + ")", False
    sizes = [int(s1) - int(s0) + 1, int(b1) - int(b0) + 1, int(p1) - int(p0) + 1,
             int(r1) - int(r0) + 1, len(MODES) if (scope.mode is None and modes > 1) else 1]
    if math.prod(sizes) >= 2 ** 62:
        return "(" + ", ".join(TOKEN_KEY) + ")", False
    mode_code = ("CASE mode " + " ".join(f"WHEN '{m}' THEN {i}" for i, m in enumerate(MODES)) +
                 " END") if sizes[4] > 1 else "0"
    return (f"(((((step - {int(s0)})::BIGINT * {sizes[1]} + (batch_idx - {int(b0)})) * {sizes[2]} "
            f"+ (position - {int(p0)})) * {sizes[3]} + (rank - {int(r0)})) * {sizes[4]} + {mode_code})",
            True)


MODE_CODE_SQL = ("(CASE mode " + " ".join(f"WHEN '{m}' THEN {i}" for i, m in enumerate(MODES)) +
                 " END)::TINYINT")


def fetch_tokens(con, scope: "Scope", columns: list[str], extra: str = "") -> dict:
    """Columns of the tokens rows in scope as NumPy arrays, in storage order (part files in
    name order, rows in written order). ``mode`` arrives as its int8 code (index in MODES)."""
    sel = ", ".join(f"{MODE_CODE_SQL} AS mode" if c == "mode" else c for c in columns)
    t = con.sql(f"SELECT {sel} FROM tokens WHERE {scope.where()} {extra}",
                params=scope.params()).to_arrow_table()
    return {c: t.column(c).to_numpy() for c in columns}


def token_keys(cols: dict) -> np.ndarray:
    """int64 key per row, equal exactly when (mode, rank, step, batch_idx, position) are equal.

    Mixed-radix packing over the observed ranges, rank and mode most significant, so rows
    written in step order have increasing keys; dense ids from ``np.unique`` when the ranges
    do not fit in 62 bits."""
    parts = [np.asarray(cols[c], dtype=np.int64) for c in ("mode", "rank", "step", "batch_idx", "position")]
    if parts[0].size == 0:
        return np.zeros(0, dtype=np.int64)
    lows = [int(p.min()) for p in parts]
    sizes = [int(p.max()) - lo + 1 for p, lo in zip(parts, lows)]
    if math.prod(sizes) >= 2 ** 62:
        return np.unique(np.stack(parts, 1), axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    key = np.zeros(parts[0].size, dtype=np.int64)
    for p, lo, size in zip(parts, lows, sizes):
        key *= size
        key += p - lo
    return key


def small_unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, int64 index of each element into them) for a small-range int
    array (layer ids), in O(n) by counting instead of np.unique's sort."""
    v = np.asarray(values).astype(np.int64, copy=False)
    if v.size == 0:
        return v, v
    lo, hi = int(v.min()), int(v.max())
    if hi - lo > 10_000_000:
        u, inv = np.unique(v, return_inverse=True)
        return u, inv.reshape(-1).astype(np.int64)
    present = np.bincount(v - lo, minlength=hi - lo + 1) > 0
    lookup = np.cumsum(present) - 1
    return np.flatnonzero(present) + lo, lookup[v - lo]


def require_tokens(con, scope: Scope, what: str, need_token_ids: bool = False) -> int:
    """Number of per-token rows in scope; AnalysisError naming the fix when there are none."""
    sql = (f"SELECT count(*), count(token_id) FROM tokens WHERE {scope.where()}")
    ((n, with_ids),) = con.execute(sql, scope.params()).fetchall()
    if n == 0:
        ((total,),) = con.execute("SELECT count(*) FROM tokens WHERE run_id = $run",
                                  {"run": scope.run}).fetchall()
        where = "" if total == 0 else f" in {scope.describe()} ({total} rows outside it)"
        raise AnalysisError(
            f"{what} needs per-token rows (the tokens table), and run {scope.run!r} has none{where}; "
            f"record them with probes.attach(model, ..., tokens=0.05) (a sampling rate) or "
            f"RunWriter.log_tokens(...)")
    if need_token_ids and with_ids == 0:
        raise AnalysisError(
            f"{what} needs token ids, and the per-token rows of run {scope.run!r} have none "
            f"(token_id is NULL): pass input_ids to the model so the probes can record them")
    return int(n)


def require_routing(con, scope: Scope, what: str) -> None:
    ((n,),) = con.execute(f"SELECT count(*) FROM routing WHERE {scope.where()}",
                          scope.params()).fetchall()
    if n == 0:
        raise AnalysisError(f"{what} needs routing rows, and run {scope.run!r} has none in "
                            f"{scope.describe()}")


def experts_per_layer(con, run: str) -> dict[int, int]:
    """{layer: number of experts}: the manifest's ``experts_per_layer`` when it has one, else
    1 + the largest expert id in the run's routing rows (tokens rows when there are none).

    Callers take ``max(this, 1 + largest id they see)`` for a layer, so a layer the
    manifest does not list (or lists too small) is still sized right."""
    import json

    out: dict[int, int] = {}
    rows = con.execute("SELECT model FROM runs WHERE run_id = $run", {"run": run}).fetchall()
    if rows and rows[0][0]:
        epl = (json.loads(rows[0][0]) or {}).get("experts_per_layer") or {}
        if isinstance(epl, dict):
            for k, v in epl.items():
                try:
                    out[int(k)] = int(v)
                except (TypeError, ValueError):
                    continue
    for table in ("routing", "tokens"):
        if out:
            break
        seen = con.execute(f"SELECT layer, max(expert) + 1 FROM {table} WHERE run_id = $run GROUP BY layer",
                           {"run": run}).fetchall()
        out = {int(layer): int(n) for layer, n in seen}
    return dict(sorted(out.items()))
