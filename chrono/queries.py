"""SQL over ``chrono.connect`` views that more than one reader runs (one owner per query).

Constants with bound ``$name`` parameters (DuckDB), used by the CLI, the
dashboard and the demo; page-specific queries stay with their page. The views
(``runs``, ``routing``, ``snapshots``, ``alerts``, ...) are ``chrono.reader``'s;
active alerts per run are ``chrono.health.ACTIVE_ALERTS_SQL``.
"""
from __future__ import annotations

# One row per run: manifest columns, routing extent and alerts raised, newest first.
# (Which alerts are active now: chrono.health.ACTIVE_ALERTS_SQL.)
RUNS_SQL = """
SELECT r.run_id, r.model, r.n_layers, r.n_experts, r.top_k, r.adapter, r.world_size,
       r.created_at, r.updated_at,
       s.steps, s.first_step, s.last_step, s.tokens,
       coalesce(a.raised, 0) AS alerts_raised
FROM runs r
LEFT JOIN (SELECT run_id, count(DISTINCT step) AS steps, min(step) AS first_step,
                  max(step) AS last_step, sum(tokens) AS tokens
           FROM routing GROUP BY run_id) s USING (run_id)
LEFT JOIN (SELECT run_id, count(*) FILTER (WHERE transition = 'raised') AS raised
           FROM alerts GROUP BY run_id) a USING (run_id)
ORDER BY r.updated_at DESC NULLS LAST, r.run_id
"""

# The columns `chrono runs` prints, same rows and order as RUNS_SQL.
RUNS_TABLE_SQL = f"""
SELECT run_id, n_layers AS layers, n_experts AS experts, top_k, adapter, steps, last_step,
       alerts_raised, updated_at
FROM ({RUNS_SQL})
ORDER BY updated_at DESC NULLS LAST, run_id
"""

# The table views RUNS_TABLE_SQL and chrono.health.ACTIVE_ALERTS_SQL read (besides ``runs``):
# ``chrono runs`` connects with only these (``chrono.connect(root, tables=...)``).
RUNS_TABLE_VIEWS = ("routing", "alerts", "snapshots")

# Snapshot rows (every layer, the global row -1 included) of the run's $windows latest windows,
# ordered by step then layer. $windows = 1: the latest snapshot; the dashboard's cards take 2 (deltas).
LATEST_SNAPSHOTS_SQL = """
SELECT * FROM snapshots WHERE run_id = $run AND step IN (
    SELECT DISTINCT step FROM snapshots WHERE run_id = $run ORDER BY step DESC LIMIT $windows)
ORDER BY step, layer
"""
