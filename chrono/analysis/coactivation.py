"""Co-activation: how often experts i and j are chosen for the same token (top-k > 1).

Needs the per-token table (``tokens=`` sampling). Per layer, with N tokens
(distinct token keys), c_i tokens that chose expert i in any top-k slot and
c_ij tokens that chose both i and j:

    lift_ij = (c_ij / N) / ((c_i / N) * (c_j / N)) = c_ij * N / (c_i * c_j)

1 means i and j are picked together as often as independent choices with the
same marginals would be; > 1 means they team up, < 1 that they avoid each
other (the observed/expected ratio used for co-occurrence, e.g. the OLMoE
paper's routing analysis, Muennighoff et al. 2024, §5). Top-k without
replacement makes c_ii = 0 by construction, so the diagonal is not reported.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import TOKEN_KEY, AnalysisError, AnalysisResult, Scope, experts_per_layer, require_tokens

NEEDS = "tokens"

_KEY = ", ".join(TOKEN_KEY)
_JOIN = " AND ".join(f"a.{c} = b.{c}" for c in TOKEN_KEY)

PAIRS_SQL = """
WITH t AS (SELECT layer, {key}, k, expert FROM tokens WHERE {where})
SELECT a.layer, least(a.expert, b.expert) AS ea, greatest(a.expert, b.expert) AS eb,
       count(*) AS n
FROM t a JOIN t b ON a.layer = b.layer AND {join} AND a.k < b.k
WHERE a.expert <> b.expert
GROUP BY ALL
"""

# a token's top-k experts are distinct and every recorded token has a slot-0 row, so
# c_i = rows of expert i and N = slot-0 rows (no DISTINCT over the 5-column key needed)
MARGINALS_SQL = """
SELECT layer, expert, count(*) AS n FROM tokens WHERE {where} GROUP BY ALL
"""

TOKENS_SQL = """
SELECT layer, count(*) FILTER (WHERE k = 0) AS n, max(k) AS max_k FROM tokens WHERE {where}
GROUP BY ALL
"""

SCHEMA = pa.schema([
    ("layer", pa.int32()), ("expert_a", pa.int32()), ("expert_b", pa.int32()),
    ("tokens_both", pa.int64()), ("tokens_a", pa.int64()), ("tokens_b", pa.int64()),
    ("tokens", pa.int64()), ("lift", pa.float64()),
])


def coactivation_matrix(con, scope: Scope) -> dict[int, dict]:
    """Per layer: {"tokens": N, "marginal": int64[n], "both": int64[n, n] (symmetric, zero diagonal),
    "lift": float64[n, n] (NaN where c_i * c_j = 0 and on the diagonal)}.

    Raises AnalysisError when the run has no per-token rows in scope or top-k is 1.
    """
    require_tokens(con, scope, "co-activation")
    fmt = {"key": _KEY, "where": scope.where(), "join": _JOIN}
    params = scope.params()
    tok = con.execute(TOKENS_SQL.format(**fmt), params).fetchnumpy()
    if int(tok["max_k"].max()) < 1:
        raise AnalysisError("co-activation needs top-k > 1: every recorded token of run "
                            f"{scope.run!r} has a single expert (k = 0 only)")
    marg = con.execute(MARGINALS_SQL.format(**fmt), params).fetchnumpy()
    pairs = con.execute(PAIRS_SQL.format(**fmt), params).fetchnumpy()
    n_exp = experts_per_layer(con, scope.run)
    out: dict[int, dict] = {}
    for layer, n_tok in zip(tok["layer"].tolist(), tok["n"].tolist()):
        n = n_exp.get(layer, 0)
        m = np.zeros(n, dtype=np.int64)
        sel = marg["layer"] == layer
        m[marg["expert"][sel]] = marg["n"][sel]
        both = np.zeros((n, n), dtype=np.int64)
        sel = pairs["layer"] == layer
        both[pairs["ea"][sel], pairs["eb"][sel]] = pairs["n"][sel]
        both = both + both.T
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = both * float(n_tok) / np.outer(m, m).astype(np.float64)
        lift[np.outer(m, m) == 0] = np.nan
        np.fill_diagonal(lift, np.nan)
        out[int(layer)] = {"tokens": int(n_tok), "marginal": m, "both": both, "lift": lift}
    return out


def coactivation(con, scope: Scope) -> AnalysisResult:
    """Rows: one per layer and expert pair a < b: tokens_both (c_ab), tokens_a, tokens_b,
    tokens (N), lift (NULL when an expert of the pair was never chosen).

    Summary: per layer the pair with the highest lift among pairs seen together."""
    mats = coactivation_matrix(con, scope)
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    summary = {}
    for layer, d in mats.items():
        n = d["marginal"].shape[0]
        ia, ib = np.triu_indices(n, k=1)
        lift = d["lift"][ia, ib]
        cols["layer"].extend([layer] * ia.size)
        cols["expert_a"].extend(ia.tolist())
        cols["expert_b"].extend(ib.tolist())
        cols["tokens_both"].extend(d["both"][ia, ib].tolist())
        cols["tokens_a"].extend(d["marginal"][ia].tolist())
        cols["tokens_b"].extend(d["marginal"][ib].tolist())
        cols["tokens"].extend([d["tokens"]] * ia.size)
        cols["lift"].extend([None if np.isnan(x) else float(x) for x in lift])
        seen = d["both"][ia, ib] > 0
        if seen.any():
            j = int(np.argmax(np.where(seen, np.nan_to_num(lift, nan=-1.0), -1.0)))
            summary[str(layer)] = {"top_pair": [int(ia[j]), int(ib[j])], "lift": float(lift[j]),
                                   "tokens": d["tokens"]}
    return AnalysisResult("coactivation", scope.run, NEEDS, pa.table(cols, schema=SCHEMA),
                          summary=summary, steps=scope.steps)
