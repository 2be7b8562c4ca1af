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

Summary per layer: matched tokens, the share of the layer's recorded tokens
that matched, the mutual information I(l; l+1) in nats and its normalisation
by H(l+1) (0 = the next choice is independent of this one, 1 = determined).

How: the slot-0 rows are fetched once (DuckDB -> NumPy); per layer the token
keys are sorted (they usually already are: rows are written in step order) and
matched with the next layer's by binary search; pairs are counted with
``np.bincount``.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .base import (AnalysisError, AnalysisResult, Scope, fetch_tokens, require_tokens, small_unique,
                   token_key_sql, token_keys)

NEEDS = "tokens (the same tokens at consecutive layers)"

SCHEMA = pa.schema([
    ("layer", pa.int32()), ("next_layer", pa.int32()), ("expert", pa.int32()),
    ("next_expert", pa.int32()), ("count", pa.int64()), ("p", pa.float64()), ("lift", pa.float64()),
])


def _sorted_by_key(key, expert):
    if key.size > 1 and not (np.diff(key) > 0).all():
        order = np.argsort(key, kind="stable")
        key, expert = key[order], expert[order]
    return key, expert


def transition_counts(con, scope: Scope) -> dict[int, tuple[int, np.ndarray, int]]:
    """{layer: (next_layer, int64[n_l, n_next] counts of (top-1 here, top-1 next), tokens at l)}."""
    sql_key, packed = token_key_sql(con, scope)
    if packed:  # one BIGINT computed by DuckDB
        t = con.sql(f"SELECT layer, expert, {sql_key} AS key FROM tokens WHERE {scope.where()} AND k = 0",
                    params=scope.params()).to_arrow_table()
        c = {n: t.column(n).to_numpy() for n in ("layer", "expert", "key")}
        key = c["key"]
    else:
        c = fetch_tokens(con, scope, ["layer", "expert", "mode", "rank", "step", "batch_idx", "position"],
                         extra="AND k = 0")
        key = token_keys(c)
    layers, li = small_unique(c["layer"])
    per = {}
    for i, layer in enumerate(layers.tolist()):
        rows = li == i
        per[layer] = _sorted_by_key(key[rows], c["expert"][rows].astype(np.int64))
    layers = layers.tolist()
    out = {}
    for layer, nxt in zip(layers[:-1], layers[1:]):
        ka, ea = per[layer]
        kb, eb = per[nxt]
        idx = np.searchsorted(kb, ka)
        ok = idx < kb.size
        ok[ok] = kb[idx[ok]] == ka[ok]
        a, b = ea[ok], eb[idx[ok]]
        n_a = int(max(ea.max(initial=-1), a.max(initial=-1))) + 1
        n_b = int(eb.max(initial=-1)) + 1
        m = np.bincount(a * n_b + b, minlength=n_a * n_b).reshape(n_a, n_b)
        out[layer] = (nxt, m, int(ka.size))
    return out


def transitions(con, scope: Scope) -> AnalysisResult:
    """Rows: (layer, next_layer, expert, next_expert, count, p, lift) for pairs seen at least once.

    ``scope.layer`` selects the transitions *from* that layer. Raises AnalysisError
    without per-token rows, with a single recorded layer, or when no token was
    recorded at two consecutive layers (sampling that picks different tokens per layer).
    """
    all_layers = Scope(scope.run, scope.steps, None, scope.mode)
    require_tokens(con, all_layers, "layer-to-layer transitions")
    counts = transition_counts(con, all_layers)
    if not counts:
        raise AnalysisError(f"layer-to-layer transitions need per-token rows at two or more layers; "
                            f"run {scope.run!r} has them at one layer only")
    if all(m.sum() == 0 for _, m, _ in counts.values()):
        raise AnalysisError(
            "layer-to-layer transitions need the same tokens recorded at consecutive layers, and no "
            f"token of run {scope.run!r} was: record with probes.attach(..., tokens=1.0) (every token) "
            "or a sampler that keeps the same positions at every layer")
    if scope.layer is not None:
        if scope.layer not in counts:
            raise AnalysisError(f"no transitions from layer {scope.layer} (the last recorded layer, "
                                f"or not recorded); layers with a next layer: {sorted(counts)}")
        counts = {scope.layer: counts[scope.layer]}
    cols: dict[str, list] = {f.name: [] for f in SCHEMA}
    summary, notes = {}, []
    for layer, (nxt, m, sampled) in counts.items():
        n = int(m.sum())
        if n == 0:
            notes.append(f"layer {layer}: none of its tokens was recorded at layer {nxt}")
            continue
        row_tot, col_tot = m.sum(1), m.sum(0)
        i, j = np.nonzero(m)
        p = m[i, j] / row_tot[i]
        lift = p / (col_tot[j] / n)
        for name, v in (("layer", [layer] * i.size), ("next_layer", [nxt] * i.size),
                        ("expert", i.tolist()), ("next_expert", j.tolist()),
                        ("count", m[i, j].tolist()), ("p", p.tolist()), ("lift", lift.tolist())):
            cols[name].extend(v)
        pij = m[i, j] / n
        mi = float(np.sum(pij * np.log(pij / ((row_tot[i] / n) * (col_tot[j] / n)))))
        q = col_tot[col_tot > 0] / n
        h_next = float(-np.sum(q * np.log(q)))
        share = n / sampled if sampled else None
        summary[str(layer)] = {"next_layer": nxt, "matched_tokens": n, "matched_share": share,
                               "mutual_information": mi,
                               "normalized_mi": mi / h_next if h_next > 0 else 0.0}
        if share is not None and share < 0.5:
            notes.append(f"layer {layer}: only {share:.1%} of its sampled tokens were also recorded at "
                         f"layer {nxt} (per-layer sampling)")
    return AnalysisResult("transitions", scope.run, NEEDS, pa.table(cols, schema=SCHEMA),
                          summary=summary, notes=notes, steps=scope.steps)
