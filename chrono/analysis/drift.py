"""Routing drift: how much each layer's routing changed between step ranges.

Two measures per layer, each range compared with a reference range:

- ``js``: Jensen-Shannon divergence between the layer's expert distributions
  (token assignments per expert / all, from the always-on ``routing`` table), in
  bits (log base 2), so 0 = identical and 1 = disjoint:
  JS(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M), M = (P + Q) / 2 (Lin 1991).
- ``top1_changed``: among token ids seen at least ``min_count`` times (slot-0 rows)
  in both ranges, the fraction whose modal top-1 expert differs (ties: smaller
  expert id); ``top1_changed_weighted`` weighs each id by its occurrences in both
  ranges. Needs per-token rows with token ids; NULL without them. Tokens are
  matched by id, not by position, because training sees different batches in
  different ranges.

``drift_series`` compares each of W equal windows with the last one: the router
saturation curve of the OLMoE paper (Muennighoff et al. 2024, §5: how much of
the final routing is already in place at each point of training).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import AnalysisError, AnalysisResult, Scope, experts_per_layer, require_routing

NEEDS = "routing (js); tokens with token_id (top1_changed)"

SCHEMA = pa.schema([
    ("window", pa.int32()), ("start", pa.int64()), ("stop", pa.int64()),
    ("ref_start", pa.int64()), ("ref_stop", pa.int64()), ("layer", pa.int32()),
    ("js", pa.float64()), ("top1_tokens", pa.int64()), ("top1_changed", pa.float64()),
    ("top1_changed_weighted", pa.float64()),
])


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence (bits) of two count or probability vectors of one length.

    Each is normalised to sum 1; an all-zero vector raises ValueError."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_divergence needs two non-empty distributions")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return 0.5 * kl(p) + 0.5 * kl(q)


def _bucket_sql(n: int) -> str:
    whens = " ".join(f"WHEN step >= $lo{i} AND step < $hi{i} THEN {i}" for i in range(n))
    return f"CASE {whens} END"


def _filters(scope: Scope) -> str:
    conds = ["run_id = $run"]
    if scope.layer is not None:
        conds.append("layer = $layer")
    if scope.mode is not None:
        conds.append("mode = $mode")
    return " AND ".join(conds)


def _params(scope: Scope, ranges) -> dict:
    p = {"run": scope.run}
    if scope.layer is not None:
        p["layer"] = int(scope.layer)
    if scope.mode is not None:
        p["mode"] = scope.mode
    for i, (lo, hi) in enumerate(ranges):
        p[f"lo{i}"], p[f"hi{i}"] = int(lo), int(hi)
    return p


ROUTING_SQL = """
SELECT bucket, layer, expert, sum(tokens) AS n FROM (
    SELECT {bucket} AS bucket, layer, expert, tokens FROM routing WHERE {filters})
WHERE bucket IS NOT NULL GROUP BY ALL
"""

TOP1_SQL = """
WITH c AS (
    SELECT bucket, layer, token_id, expert, count(*) AS n FROM (
        SELECT {bucket} AS bucket, layer, token_id, expert FROM tokens
        WHERE {filters} AND k = 0 AND token_id IS NOT NULL)
    WHERE bucket IS NOT NULL GROUP BY ALL),
m AS (  -- modal expert per id (ties: the smaller expert; experts < 2^20) and the id's occurrences
    SELECT bucket, layer, token_id, arg_max(expert, n * 1048576 - expert) AS expert, sum(n) AS occ
    FROM c GROUP BY ALL)
SELECT a.bucket, a.layer, count(*) AS ids, avg((a.expert <> r.expert)::DOUBLE) AS changed,
       sum((a.expert <> r.expert)::DOUBLE * (a.occ + r.occ)) / sum(a.occ + r.occ) AS changed_w
FROM m a JOIN m r ON r.bucket = $ref AND a.layer = r.layer AND a.token_id = r.token_id
WHERE a.bucket <> $ref AND a.occ >= $min_count AND r.occ >= $min_count
GROUP BY ALL
"""


def drift_ranges(con, scope: Scope, ranges: list[tuple[int, int]], min_count: int = 5) -> pa.Table:
    """Each of ``ranges[:-1]`` (half-open step ranges) against the last one, per layer.

    Rows follow SCHEMA (``window`` = index in ``ranges``). ``js`` is NULL for a layer with no
    routing rows in either range; the top-1 columns are NULL without per-token rows."""
    if len(ranges) < 2:
        raise AnalysisError("drift needs at least two step ranges")
    if min_count < 1:
        raise AnalysisError("--min-count must be >= 1")
    bucket, filters = _bucket_sql(len(ranges)), _filters(scope)
    params = _params(scope, ranges)
    ref = len(ranges) - 1
    r = con.execute(ROUTING_SQL.format(bucket=bucket, filters=filters), params).fetchnumpy()
    t = con.execute(TOP1_SQL.format(bucket=bucket, filters=filters),
                    dict(params, ref=ref, min_count=int(min_count))).fetchnumpy()
    n_exp = experts_per_layer(con, scope.run)
    layers = sorted(set(r["layer"].tolist()))
    dist = {}
    for layer in layers:
        n = max(n_exp.get(layer, 0), int(r["expert"][r["layer"] == layer].max()) + 1)
        for b in range(len(ranges)):
            sel = (r["layer"] == layer) & (r["bucket"] == b)
            v = np.zeros(n)
            np.add.at(v, r["expert"][sel], r["n"][sel].astype(np.float64))
            dist[(b, layer)] = v
    top1 = {(int(b), int(l)): (int(i), float(c), float(w)) for b, l, i, c, w in
            zip(t["bucket"], t["layer"], t["ids"], t["changed"], t["changed_w"])}
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    for b in range(ref):
        for layer in layers:
            p, q = dist[(b, layer)], dist[(ref, layer)]
            js = js_divergence(p, q) if p.sum() > 0 and q.sum() > 0 else None
            ids, ch, chw = top1.get((b, layer), (None, None, None))
            for name, v in (("window", b), ("start", ranges[b][0]), ("stop", ranges[b][1]),
                            ("ref_start", ranges[ref][0]), ("ref_stop", ranges[ref][1]),
                            ("layer", layer), ("js", js), ("top1_tokens", ids),
                            ("top1_changed", ch), ("top1_changed_weighted", chw)):
                cols[name].append(v)
    return pa.table(cols, schema=SCHEMA)


def step_bounds(con, scope: Scope) -> tuple[int, int]:
    """[first, last + 1) of the run's routing steps within ``scope.steps``."""
    require_routing(con, scope, "drift")
    ((lo, hi),) = con.execute(f"SELECT min(step), max(step) + 1 FROM routing WHERE {scope.where()}",
                              scope.params()).fetchall()
    return int(lo), int(hi)


def windows(lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous half-open windows covering [lo, hi) (fewer when there are fewer steps)."""
    n = max(1, min(n, hi - lo))
    edges = [lo + (i * (hi - lo)) // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def drift(con, scope: Scope, against: tuple[int | None, int | None] | None = None,
          n_windows: int = 10, min_count: int = 5) -> AnalysisResult:
    """With ``against``: the scope's step range vs ``against`` (one row per layer).
    Without: the scope's range split into ``n_windows`` windows, each vs the last.

    Raises AnalysisError without routing rows in a range, or when the two ranges overlap."""
    if against is not None:
        a_lo, a_hi = step_bounds(con, scope)
        b_lo, b_hi = step_bounds(con, scope.with_steps(against))
        if a_lo < b_hi and b_lo < a_hi:   # a step can count in one range only
            example = f", e.g. --steps {b_hi}: --against {b_lo}:{b_hi}" if b_hi < a_hi else ""
            raise AnalysisError(
                f"the step ranges overlap: {scope.describe()} covers steps {a_lo}..{a_hi - 1} and "
                f"--against has {b_lo}..{b_hi - 1}; drift compares two disjoint ranges{example}")
        ranges = [(a_lo, a_hi), (b_lo, b_hi)]
    else:
        if n_windows < 2:
            raise AnalysisError("--windows must be >= 2")
        lo, hi = step_bounds(con, scope)
        ranges = windows(lo, hi, n_windows)
        if len(ranges) < 2:
            raise AnalysisError(f"drift needs at least two steps; run {scope.run!r} has one in "
                                f"{scope.describe()}")
    table = drift_ranges(con, scope, ranges, min_count)
    notes = []
    if table.num_rows and table.column("top1_tokens").null_count == table.num_rows:
        notes.append(f"top1_changed is empty: it needs per-token rows with token ids seen at least "
                     f"{min_count} times in both ranges (probes.attach(..., tokens=...))")
    summary = {}
    for row in table.to_pylist():
        if row["window"] == 0 or against is not None:
            summary[str(row["layer"])] = {"js_first_vs_ref": row["js"],
                                          "top1_changed_first_vs_ref": row["top1_changed"]}
    mean_js = [v for v in table.column("js").to_pylist() if v is not None]
    summary["mean_js"] = float(np.mean(mean_js)) if mean_js else None
    return AnalysisResult("drift", scope.run, NEEDS, table, summary=summary, notes=notes,
                          steps=scope.steps)

