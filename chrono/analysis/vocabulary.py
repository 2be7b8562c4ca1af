"""Vocabulary specialization: which token ids each expert receives, and how concentrated
its vocabulary is compared with the corpus the layer saw.

Needs the per-token table with token ids. Per layer, over every top-k slot,
n_et = assignments of token id t to expert e, n_e = sum_t n_et, n_t = sum_e n_et,
N = sum n_et, occ_t = occurrences of t (its slot-0 rows). Then

- ``p_token_given_expert``  P(t|e) = n_et / n_e
- ``p_expert_given_token``  n_et / occ_t: the share of t's occurrences that chose e
  in any slot (the "vocabulary specialization" of the OLMoE paper, Muennighoff et
  al. 2024, §5: 1.0 means every occurrence of t goes to e)
- ``lift``                   P(t|e) / Q(t), Q(t) = n_t / N the layer's token frequency
- ``expert_entropy``         H(P(.|e)) in nats; low = a narrow vocabulary
- ``expert_kl``              KL(P(.|e) || Q) in nats; 0 = the expert sees the corpus mix,
  large = specialised (the purity score against corpus frequency)

How: the rows' (layer, expert, token_id, k) are fetched once (DuckDB -> NumPy)
and counted with ``np.bincount`` over a dense (layer, expert, token) index
(``np.unique`` when that index would be too large); every statistic above is a
weighted bincount over those counts.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import AnalysisError, AnalysisResult, Scope, fetch_tokens, require_tokens, small_unique

NEEDS = "tokens (with token_id)"
DENSE_LIMIT = 50_000_000  # bins of the dense (layer, expert, token) index before np.unique is used

SCHEMA = pa.schema([
    ("layer", pa.int32()), ("expert", pa.int32()), ("rank", pa.int32()), ("token_id", pa.int64()),
    ("count", pa.int64()), ("p_token_given_expert", pa.float64()),
    ("p_expert_given_token", pa.float64()), ("lift", pa.float64()),
    ("expert_assignments", pa.int64()), ("expert_distinct_tokens", pa.int64()),
    ("expert_entropy", pa.float64()), ("expert_kl", pa.float64()),
])


def _group(idx: np.ndarray, n_bins: int, weights=None):
    """(unique bins, counts[, summed weights]) of an int64 index."""
    if n_bins <= DENSE_LIMIT:
        n = np.bincount(idx, minlength=n_bins)
        nz = np.flatnonzero(n)
        w = None if weights is None else np.bincount(idx, weights=weights, minlength=n_bins)[nz]
        return nz, n[nz], w
    u, inv = np.unique(idx, return_inverse=True)
    return u, np.bincount(inv), None if weights is None else np.bincount(inv, weights=weights)


def vocabulary(con, scope: Scope, top: int = 5) -> AnalysisResult:
    """Rows: the ``top`` most frequent token ids of every expert (``rank`` 1 = most), with the
    columns in the module docstring; ties broken by smaller token id.

    Summary per layer: corpus entropy H(Q) (nats), distinct token ids, and the expert with
    the largest KL to the corpus. Raises AnalysisError without per-token rows or token ids.
    """
    if top < 1:
        raise AnalysisError("--top must be >= 1")
    require_tokens(con, scope, "vocabulary specialization", need_token_ids=True)
    c = fetch_tokens(con, scope, ["layer", "expert", "token_id", "k"], extra="AND token_id IS NOT NULL")
    layers, li = small_unique(c["layer"])
    E = int(c["expert"].max()) + 1
    t0 = int(c["token_id"].min())
    V = int(c["token_id"].max()) - t0 + 1
    L = layers.size
    idx = (li * E + c["expert"].astype(np.int64)) * V + (c["token_id"].astype(np.int64) - t0)
    cell, n, n0 = _group(idx, L * E * V, weights=(c["k"] == 0).astype(np.float64))
    ge, t = cell // V, cell % V  # (layer, expert) group and token offset of each nonzero cell
    l_of = ge // E
    n = n.astype(np.float64)
    n_e = np.bincount(ge, weights=n, minlength=L * E)
    distinct = np.bincount(ge, minlength=L * E)
    gt_u, gt_inv = np.unique(l_of * V + t, return_inverse=True)
    n_t = np.bincount(gt_inv, weights=n)
    occ = np.bincount(gt_inv, weights=n0)
    n_all = np.bincount(l_of, weights=n, minlength=L)
    p = n / n_e[ge]
    q = n_t[gt_inv] / n_all[l_of]
    h = -np.bincount(ge, weights=p * np.log(p), minlength=L * E)
    kl = np.bincount(ge, weights=p * np.log(p / q), minlength=L * E)
    order = np.lexsort((t, -n, ge))
    g_sorted = ge[order]
    first = np.searchsorted(g_sorted, g_sorted, side="left")
    rank = np.arange(order.size) - first
    keep = order[rank < top]
    rank = rank[rank < top] + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        p_e_t = np.where(occ[gt_inv] > 0, n / occ[gt_inv], np.nan)
    g = ge[keep]
    table = pa.table({
        "layer": layers[g // E].astype(np.int32), "expert": (g % E).astype(np.int32),
        "rank": rank.astype(np.int32), "token_id": t[keep] + t0, "count": n[keep].astype(np.int64),
        "p_token_given_expert": p[keep], "p_expert_given_token": pa.array(p_e_t[keep], from_pandas=True),
        "lift": p[keep] / q[keep], "expert_assignments": n_e[g].astype(np.int64),
        "expert_distinct_tokens": distinct[g].astype(np.int64), "expert_entropy": h[g] + 0.0,
        "expert_kl": kl[g],
    }, schema=SCHEMA)
    summary = {}
    qt = n_t / n_all[gt_u // V]
    corpus_h = -np.bincount(gt_u // V, weights=qt * np.log(qt), minlength=L)
    corpus_n = np.bincount(gt_u // V, minlength=L)
    for i, layer in enumerate(layers.tolist()):
        groups = np.arange(i * E, (i + 1) * E)
        groups = groups[n_e[groups] > 0]
        best = int(groups[np.argmax(kl[groups])]) if groups.size else None
        summary[str(layer)] = {
            "corpus_entropy": float(corpus_h[i]), "distinct_tokens": int(corpus_n[i]),
            "most_specialized_expert": None if best is None else best % E,
            "max_expert_kl": None if best is None else float(kl[best]),
        }
    return AnalysisResult("vocabulary", scope.run, NEEDS, table, summary=summary, steps=scope.steps)
