"""Load percentiles: the distribution of tokens per expert within each layer, and of a
balance metric across layers (what Megatron-LM issue #2398 asks for).

Needs only the always-on ``routing`` table. Per layer, over the step range,
``load[e]`` = token assignments to expert e (summed over steps, modes, ranks;
experts the manifest declares but that received nothing count as 0):

- min / p50 / p90 / p99 / max / mean / std (population, ddof = 0) of ``load``;
  percentiles interpolate linearly between order statistics (NumPy's default,
  "type 7" of Hyndman & Fan 1996, DuckDB's ``quantile_cont``)
- ``cv`` = std / mean, ``max_violation`` = max / mean - 1 (MaxVio, Wang et al. 2024,
  "Auxiliary-loss-free load balancing"), as ``chrono.metrics`` defines them

Summary: percentiles (p50/p90/p99/max) of ``max_violation`` across layers (of the
range totals) and across every (step, layer) of the range (per-step imbalance,
which totals over many steps hide).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import AnalysisResult, Scope, experts_per_layer, require_routing

NEEDS = "routing"

TOTALS_SQL = "SELECT layer, expert, sum(tokens) AS n FROM routing WHERE {where} GROUP BY ALL"

PER_STEP_SQL = """
SELECT step, layer, max(n) AS mx, sum(n) AS total FROM (
    SELECT step, layer, expert, sum(tokens) AS n FROM routing WHERE {where} GROUP BY ALL)
GROUP BY ALL
"""

SCHEMA = pa.schema([
    ("layer", pa.int32()), ("experts", pa.int32()), ("tokens", pa.int64()),
    ("min", pa.float64()), ("p50", pa.float64()), ("p90", pa.float64()), ("p99", pa.float64()),
    ("max", pa.float64()), ("mean", pa.float64()), ("std", pa.float64()),
    ("cv", pa.float64()), ("max_violation", pa.float64()),
])

PCTS = (50, 90, 99)


def layer_loads(con, scope: Scope, what: str = "load percentiles") -> dict[int, np.ndarray]:
    """{layer: int64[n_experts] tokens per expert over the scope}; AnalysisError if no routing rows
    (``what``: the caller's name for itself in that message)."""
    require_routing(con, scope, what)
    r = con.execute(TOTALS_SQL.format(where=scope.where()), scope.params()).fetchnumpy()
    n_exp = experts_per_layer(con, scope.run)
    out = {}
    for layer in sorted(set(r["layer"].tolist())):
        sel = r["layer"] == layer
        v = np.zeros(max(n_exp.get(layer, 0), int(r["expert"][sel].max()) + 1), dtype=np.int64)
        np.add.at(v, r["expert"][sel], r["n"][sel].astype(np.int64))
        out[int(layer)] = v
    return out


DENSE_LIMIT = 50_000_000  # (step, layer, expert) cells counted densely in NumPy; SQL beyond


def per_step_max_violation(con, scope: Scope, n_exp: dict[int, int]) -> np.ndarray:
    """max / mean - 1 of every (step, layer) with tokens in scope (experts absent count as 0);
    ``n_exp`` = {layer: experts} of every layer in scope (``layer_loads`` sizes).

    Rows are summed per (step, layer, expert) first (several ranks or modes may share a step):
    densely with ``np.bincount`` when the cells fit ``DENSE_LIMIT``, else in DuckDB."""
    t = con.sql(f"SELECT step, layer, expert, tokens FROM routing WHERE {scope.where()}",
                params=scope.params()).to_arrow_table()
    if t.num_rows == 0:
        return np.zeros(0)
    step, layer, expert = (t.column(c).to_numpy() for c in ("step", "layer", "expert"))
    s0, l0 = int(step.min()), int(layer.min())
    S, L = int(step.max()) - s0 + 1, int(layer.max()) - l0 + 1
    E = max(int(expert.max()) + 1, max(n_exp.values(), default=0))
    cells = S * L * E  # dense over the step and layer ranges; empty (step, layer) cells drop out
    n = np.array([n_exp.get(l0 + i, E) for i in range(L)], dtype=np.float64)
    if cells <= DENSE_LIMIT:
        tok = np.bincount(((step - s0) * L + (layer - l0)) * E + expert,
                          weights=t.column("tokens").to_numpy().astype(np.float64),
                          minlength=cells).reshape(S, L, E)
        mx, total = tok.max(2), tok.sum(2)
        nn = np.broadcast_to(n, total.shape)
    else:
        r = con.execute(PER_STEP_SQL.format(where=scope.where()), scope.params()).fetchnumpy()
        mx, total = r["mx"].astype(np.float64), r["total"].astype(np.float64)
        nn = n[r["layer"].astype(np.int64) - l0]
    ok = total > 0
    return mx[ok] / (total[ok] / nn[ok]) - 1


def _pct_summary(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {}
    out = {f"p{p}": float(np.percentile(v, p)) for p in PCTS}
    out["max"] = float(v.max())
    return out


def loads(con, scope: Scope) -> AnalysisResult:
    """Rows: one per layer (SCHEMA). Summary: ``max_violation_across_layers`` and
    ``max_violation_across_steps`` percentiles, and the number of (step, layer) pairs."""
    per_layer = layer_loads(con, scope)
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for layer, v in per_layer.items():
        f = v.astype(np.float64)
        mean = f.mean()
        std = f.std()
        row = {"layer": layer, "experts": v.size, "tokens": int(v.sum()), "min": float(f.min()),
               "max": float(f.max()), "mean": float(mean), "std": float(std),
               "cv": float(std / mean) if mean > 0 else None,
               "max_violation": float(f.max() / mean - 1) if mean > 0 else None}
        row.update({f"p{p}": float(np.percentile(f, p)) for p in PCTS})
        for k in cols:
            cols[k].append(row[k])
    table = pa.table(cols, schema=SCHEMA)
    step_mv = per_step_max_violation(con, scope, {l: v.size for l, v in per_layer.items()})
    layer_mv = [x for x in cols["max_violation"] if x is not None]
    summary = {"max_violation_across_layers": _pct_summary(layer_mv),
               "max_violation_across_steps": _pct_summary(step_mv),
               "step_layer_pairs": int(step_mv.size)}
    return AnalysisResult("loads", scope.run, NEEDS, table, summary=summary, steps=scope.steps)
