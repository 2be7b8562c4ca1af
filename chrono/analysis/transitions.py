"""Layer-to-layer transitions: P(top-1 expert at the next layer = j | top-1 at layer l = i)
for the same token.

Needs the per-token table with the *same tokens* recorded at consecutive layers
(a token's rows share its key (mode, rank, step, batch_idx, position), see
``chrono.analysis.base``). "Next layer" is the next recorded router layer, so a
model with MoE layers 1, 3, 5 pairs 1->3 and 3->5. Only slot 0 (the top-1
choice) is used. Per pair (i, j) of layer l:

- ``count``  tokens with top-1 i at l and top-1 j at the next layer
- ``p``      count / (tokens with top-1 i at l that reach the next layer): P(j | i)
- ``lift``   p / P(j), P(j) = share of matched tokens with top-1 j at the next layer

Summary per layer: matched tokens, the mutual information I(l; l+1) in nats
and its normalisation by H(l+1) (0 = the next choice is independent of this
one, 1 = fully determined).
"""
from __future__ import annotations

import math

import pyarrow as pa

from .base import TOKEN_KEY, AnalysisError, AnalysisResult, Scope, require_tokens

NEEDS = "tokens (the same tokens at consecutive layers)"

_JOIN = " AND ".join(f"a.{c} = b.{c}" for c in TOKEN_KEY)

SQL = """
WITH t AS (SELECT layer, {key}, expert FROM tokens WHERE {where} AND k = 0),
nxt AS (SELECT layer, lead(layer) OVER (ORDER BY layer) AS next_layer
        FROM (SELECT DISTINCT layer FROM t)),
pairs AS (
    SELECT a.layer, b.layer AS next_layer, a.expert AS ea, b.expert AS eb, count(*) AS n
    FROM t a JOIN nxt USING (layer) JOIN t b ON b.layer = nxt.next_layer AND {join}
    GROUP BY ALL),
fr AS (SELECT layer, ea, sum(n) AS n_i FROM pairs GROUP BY ALL),
tj AS (SELECT layer, eb, sum(n) AS n_j FROM pairs GROUP BY layer, eb),
tl AS (SELECT layer, eb, n_j, sum(n_j) OVER (PARTITION BY layer) AS n_l FROM tj)
SELECT pairs.layer::INTEGER AS layer, next_layer::INTEGER AS next_layer,
       ea::INTEGER AS expert, eb::INTEGER AS next_expert, n::BIGINT AS count,
       n / n_i AS p, (n / n_i) / (n_j / n_l) AS lift
FROM pairs JOIN fr USING (layer, ea) JOIN tl USING (layer, eb)
ORDER BY layer, expert, next_expert
"""

SAMPLED_SQL = """
SELECT layer, count(*) AS n FROM tokens WHERE {where} AND k = 0 GROUP BY ALL ORDER BY layer
"""


def transitions(con, scope: Scope) -> AnalysisResult:
    """Rows: (layer, next_layer, expert, next_expert, count, p, lift) for pairs seen at least once.

    ``scope.layer`` selects the transitions *from* that layer. Raises AnalysisError
    without per-token rows, with a single recorded layer, or when no token was
    recorded at two consecutive layers (sampling that picks different tokens per layer).
    """
    all_layers = Scope(scope.run, scope.steps, None, scope.mode)
    require_tokens(con, all_layers, "layer-to-layer transitions")
    sampled = dict(con.execute(SAMPLED_SQL.format(where=all_layers.where()),
                               all_layers.params()).fetchall())
    if len(sampled) < 2:
        raise AnalysisError(f"layer-to-layer transitions need per-token rows at two or more layers; "
                            f"run {scope.run!r} has them at layer(s) {sorted(sampled)} only")
    fmt = {"key": ", ".join(TOKEN_KEY), "where": all_layers.where(), "join": _JOIN}
    table = con.sql(SQL.format(**fmt), params=all_layers.params()).to_arrow_table()
    if table.num_rows == 0:
        raise AnalysisError(
            "layer-to-layer transitions need the same tokens recorded at consecutive layers, and no "
            f"token of run {scope.run!r} was: record with probes.attach(..., tokens=1.0) (every token) "
            "or a sampler that keeps the same positions at every layer")
    if scope.layer is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table.column("layer"), scope.layer))
        if table.num_rows == 0:
            raise AnalysisError(f"no transitions from layer {scope.layer} (the last recorded layer, "
                                f"or not recorded); layers: {sorted(sampled)}")
    notes = []
    summary = {}
    rows = table.to_pylist()
    for layer in sorted({r["layer"] for r in rows}):
        mine = [r for r in rows if r["layer"] == layer]
        n = sum(r["count"] for r in mine)
        pi: dict[int, float] = {}
        pj: dict[int, float] = {}
        for r in mine:
            pi[r["expert"]] = pi.get(r["expert"], 0) + r["count"] / n
            pj[r["next_expert"]] = pj.get(r["next_expert"], 0) + r["count"] / n
        mi = sum((r["count"] / n) * math.log((r["count"] / n) / (pi[r["expert"]] * pj[r["next_expert"]]))
                 for r in mine)
        h_next = -sum(p * math.log(p) for p in pj.values() if p > 0)
        matched_share = n / sampled[layer] if sampled.get(layer) else None
        summary[str(layer)] = {"next_layer": mine[0]["next_layer"], "matched_tokens": n,
                               "matched_share": matched_share, "mutual_information": mi,
                               "normalized_mi": mi / h_next if h_next > 0 else 0.0}
        if matched_share is not None and matched_share < 0.5:
            notes.append(f"layer {layer}: only {matched_share:.1%} of its sampled tokens were also "
                         f"recorded at layer {mine[0]['next_layer']} (per-layer sampling)")
    return AnalysisResult("transitions", scope.run, NEEDS, table, summary=summary, notes=notes,
                          steps=scope.steps)
