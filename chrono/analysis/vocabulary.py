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
"""
from __future__ import annotations

import pyarrow as pa

from .base import AnalysisResult, Scope, require_tokens

NEEDS = "tokens (with token_id)"

SQL = """
WITH c AS (
    SELECT layer, expert, token_id, count(*) AS n, count(*) FILTER (WHERE k = 0) AS n0
    FROM tokens WHERE {where} AND token_id IS NOT NULL GROUP BY ALL),
tok AS (SELECT layer, token_id, sum(n) AS n_t, sum(n0) AS occ FROM c GROUP BY ALL),
tot AS (SELECT layer, sum(n) AS n_all FROM c GROUP BY ALL),
ex AS (SELECT layer, expert, sum(n) AS n_e, count(*) AS distinct_tokens FROM c GROUP BY ALL),
j AS (
    SELECT c.layer, c.expert, c.token_id, c.n, ex.n_e, ex.distinct_tokens, tok.occ,
           c.n / ex.n_e AS p, tok.n_t / tot.n_all AS q
    FROM c JOIN ex USING (layer, expert) JOIN tok USING (layer, token_id) JOIN tot USING (layer)),
st AS (SELECT layer, expert, -sum(p * ln(p)) AS h, sum(p * ln(p / q)) AS kl FROM j GROUP BY ALL),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY layer, expert ORDER BY n DESC, token_id) AS r FROM j
    QUALIFY r <= $top)
SELECT ranked.layer::INTEGER AS layer, ranked.expert::INTEGER AS expert, r::INTEGER AS rank,
       token_id, n::BIGINT AS count, p AS p_token_given_expert,
       CASE WHEN occ > 0 THEN n / occ END AS p_expert_given_token, p / q AS lift,
       n_e::BIGINT AS expert_assignments, distinct_tokens::BIGINT AS expert_distinct_tokens,
       st.h AS expert_entropy, st.kl AS expert_kl
FROM ranked JOIN st USING (layer, expert)
ORDER BY layer, expert, rank
"""

CORPUS_SQL = """
WITH c AS (SELECT layer, token_id, count(*) AS n FROM tokens
           WHERE {where} AND token_id IS NOT NULL GROUP BY ALL),
t AS (SELECT layer, n / sum(n) OVER (PARTITION BY layer) AS q FROM c)
SELECT layer, -sum(q * ln(q)) AS h, count(*) AS distinct_tokens FROM t GROUP BY ALL ORDER BY layer
"""


def vocabulary(con, scope: Scope, top: int = 5) -> AnalysisResult:
    """Rows: the ``top`` most frequent token ids of every expert (``rank`` 1 = most), with the
    columns in the module docstring; ties broken by smaller token id.

    Summary per layer: corpus entropy H(Q) (nats), distinct token ids, and the expert with
    the largest KL to the corpus. Raises AnalysisError without per-token rows or token ids.
    """
    if top < 1:
        from .base import AnalysisError

        raise AnalysisError("--top must be >= 1")
    require_tokens(con, scope, "vocabulary specialization", need_token_ids=True)
    where = scope.where()
    table = con.sql(SQL.format(where=where), params=scope.params(top=int(top))).to_arrow_table()
    corpus = con.execute(CORPUS_SQL.format(where=where), scope.params()).fetchall()
    summary = {}
    rows = table.select(["layer", "expert", "expert_kl", "expert_entropy"]).to_pylist()
    for layer, h, distinct in corpus:
        mine = [r for r in rows if r["layer"] == layer]
        best = max(mine, key=lambda r: r["expert_kl"]) if mine else None
        summary[str(layer)] = {
            "corpus_entropy": float(h), "distinct_tokens": int(distinct),
            "most_specialized_expert": None if best is None else int(best["expert"]),
            "max_expert_kl": None if best is None else float(best["expert_kl"]),
        }
    return AnalysisResult("vocabulary", scope.run, NEEDS, table, summary=summary, steps=scope.steps)
