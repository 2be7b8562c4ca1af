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

How: the writers store a token's top-k rows next to each other (slots 0..k-1).
When the fetched rows verify that (every block of k rows has one token key and
layer, slots in order), pairs are counted with ``np.bincount`` in one pass.
Otherwise, in SQL, each token's set of experts becomes a bit mask
(``bit_or(1 << expert)``, layers of up to 64 experts) grouped by token key and
masks are counted per layer; wider layers use a self-join on the token key.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import (AnalysisError, AnalysisResult, Scope, experts_per_layer, fetch_tokens,
                   require_tokens, small_unique, token_key_sql)

NEEDS = "tokens"
MASK_BITS = 64

MASKS_SQL = """
WITH m AS (SELECT layer, bit_or((1::UBIGINT) << expert::UBIGINT) AS mask, max(k) AS top
           FROM tokens WHERE {where} GROUP BY layer, {key})
SELECT layer, mask::VARCHAR AS mask, count(*) AS n, max(top) AS max_k FROM m GROUP BY layer, mask
"""

PAIRS_SQL = """
WITH t AS (SELECT layer, {key} AS key, k, expert FROM tokens WHERE {where})
SELECT a.layer, least(a.expert, b.expert) AS ea, greatest(a.expert, b.expert) AS eb, count(*) AS n
FROM t a JOIN t b ON a.layer = b.layer AND a.key = b.key AND a.k < b.k
WHERE a.expert <> b.expert GROUP BY ALL
"""

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


def _from_masks(rows, n: int):
    """(N, c int64[n], both int64[n, n]) from (mask, count) pairs of one layer."""
    masks = np.array([int(m) for m, _ in rows], dtype=np.uint64)
    counts = np.array([c for _, c in rows], dtype=np.int64)
    bits = ((masks[:, None] >> np.arange(n, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.int64)
    c = counts @ bits
    both = (bits * counts[:, None]).T @ bits
    np.fill_diagonal(both, 0)
    return int(counts.sum()), c, both


def _by_join(con, scope, key, n_exp):
    fmt = {"where": scope.where(), "key": key}
    params = scope.params()
    tok = con.execute(TOKENS_SQL.format(**fmt), params).fetchnumpy()
    marg = con.execute(MARGINALS_SQL.format(**fmt), params).fetchnumpy()
    pairs = con.execute(PAIRS_SQL.format(**fmt), params).fetchnumpy()
    out = {}
    for layer, n_tok, max_k in zip(tok["layer"].tolist(), tok["n"].tolist(), tok["max_k"].tolist()):
        sel = marg["layer"] == layer
        n = max(n_exp.get(layer, 0), int(marg["expert"][sel].max(initial=-1)) + 1)
        m = np.zeros(n, dtype=np.int64)
        m[marg["expert"][sel]] = marg["n"][sel]
        both = np.zeros((n, n), dtype=np.int64)
        sel = pairs["layer"] == layer
        both[pairs["ea"][sel], pairs["eb"][sel]] = pairs["n"][sel]
        out[layer] = (int(n_tok), m, both + both.T, int(max_k))
    return out


def _by_blocks(con, scope, n_exp):
    """The adjacent-rows fast path; None when the stored rows are not in token blocks."""
    key_cols = ["layer", "mode", "rank", "step", "batch_idx", "position"]
    c = fetch_tokens(con, scope, ["k", "expert"] + key_cols)
    k = c["k"]
    K = int(k.max()) + 1
    if k.size % K:
        return None
    kb = k.reshape(-1, K)
    if not (kb == np.arange(K, dtype=kb.dtype)).all():
        return None
    for col in key_cols:  # every row of a block belongs to the block's first row's token
        v = c[col].reshape(-1, K)
        if not all((v[:, j] == v[:, 0]).all() for j in range(1, K)):
            return None
    lay = c["layer"].reshape(-1, K)
    layers, li = small_unique(lay[:, 0])
    X = c["expert"].reshape(-1, K).astype(np.int64)
    E = max(max(n_exp.get(int(l), 0) for l in layers), int(X.max()) + 1)
    n_tok = np.bincount(li, minlength=layers.size)
    marg = np.bincount((li[:, None] * E + X).reshape(-1), minlength=layers.size * E).reshape(-1, E)
    both = np.zeros(layers.size * E * E, dtype=np.int64)
    for a in range(K):
        for b in range(a + 1, K):
            lo, hi = np.minimum(X[:, a], X[:, b]), np.maximum(X[:, a], X[:, b])
            both += np.bincount((li * E + lo) * E + hi, minlength=both.size)
    both = both.reshape(-1, E, E)
    out = {}
    for i, layer in enumerate(layers.tolist()):
        n = max(n_exp.get(layer, 0), int(np.flatnonzero(marg[i]).max(initial=-1)) + 1)
        bl = both[i, :n, :n]
        bl = bl + bl.T
        np.fill_diagonal(bl, 0)
        out[layer] = (int(n_tok[i]), marg[i, :n].copy(), bl, K - 1)
    return out


def coactivation_matrix(con, scope: Scope, fast: bool = True) -> dict[int, dict]:
    """Per layer: {"tokens": N, "marginal": int64[n], "both": int64[n, n] (symmetric, zero diagonal),
    "lift": float64[n, n] (NaN where c_i * c_j = 0 and on the diagonal)}.

    Raises AnalysisError when the run has no per-token rows in scope or top-k is 1.
    ``fast=False`` skips the adjacent-rows path (tests compare the two).
    """
    require_tokens(con, scope, "co-activation")
    n_exp = experts_per_layer(con, scope.run)
    raw = _by_blocks(con, scope, n_exp) if fast else None
    if raw is not None:
        widest = 0
    else:  # the rows decide whether a 64-bit mask holds every expert id (a manifest may undercount)
        ((widest,),) = con.execute(f"SELECT max(expert) + 1 FROM tokens WHERE {scope.where()}",
                                   scope.params()).fetchall()
    if raw is None and max(max(n_exp.values(), default=0), int(widest)) <= MASK_BITS:
        key = token_key_sql(con, scope)[0]
        r = con.execute(MASKS_SQL.format(where=scope.where(), key=key), scope.params()).fetchall()
        per_layer: dict[int, list] = {}
        tops: dict[int, int] = {}
        for layer, mask, n, max_k in r:
            per_layer.setdefault(int(layer), []).append((mask, n))
            tops[int(layer)] = max(tops.get(int(layer), 0), int(max_k))
        raw = {l: (*_from_masks(rows, max(n_exp.get(l, 0), max(int(m).bit_length() for m, _ in rows))),
                   tops[l]) for l, rows in per_layer.items()}
    elif raw is None:
        raw = _by_join(con, scope, token_key_sql(con, scope)[0], n_exp)
    if max(v[3] for v in raw.values()) < 1:
        raise AnalysisError("co-activation needs top-k > 1: every recorded token of run "
                            f"{scope.run!r} has a single expert (k = 0 only)")
    out: dict[int, dict] = {}
    for layer in sorted(raw):
        n_tok, m, both, _ = raw[layer]
        mm = np.outer(m, m).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = both * float(n_tok) / mm
        lift[mm == 0] = np.nan
        np.fill_diagonal(lift, np.nan)
        out[layer] = {"tokens": n_tok, "marginal": m, "both": both, "lift": lift}
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
