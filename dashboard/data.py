"""Cached, read-only loaders: every number the dashboard shows comes through here.

One DuckDB connection per store root (``chrono.connect``, sandboxed and
read-only) is kept with ``st.cache_resource``; query results are kept with
``st.cache_data``. A result's cache key includes a *version* of the run it
reads, from the store's follower (``chrono.follow.Follower``): it changes when
the run's visible parts or its manifest change, including two parts landing
in one mtime tick and parts superseded by compaction or truncation. A live
page that re-runs every few seconds therefore costs a few ``stat`` calls per
run while nothing is written, and sees new parts as soon as they land; when
the follower reports a change, ``chrono.refresh`` rebuilds the views.

Big runs never reach the browser row by row: step axes are binned in SQL to a
pixel budget (``STEP_BINS`` columns for heatmaps, ``LINE_POINTS`` points per
line), so a 10 k-step x 64-expert layer is a few thousand cells.

SQL lives in constants below with bound ``$name`` parameters; nothing
user-typed is formatted into SQL except on the SQL page, which goes through
``chrono.reader.run_readonly_sql`` (refuses anything but queries).
"""
from __future__ import annotations

import json
import math
import threading
import warnings
import time
from pathlib import Path

import pandas as pd
import streamlit as st

import chrono
from chrono.health import ACTIVE_ALERTS_SQL, health_of
from chrono.queries import LATEST_SNAPSHOTS_SQL, RUNS_SQL  # noqa: F401  (shared queries, used by pages)
from chrono.follow import Follower
from chrono.store import default_root

ROOT_ENV = "CHRONO_ROOT"
STEP_BINS = 300  # heatmap columns: about one per 3 px of a wide chart
LINE_POINTS = 500  # points per line series
CHECK_EVERY_S = 1.0  # how often the store is polled for changes (live pages)
SQL_ROW_LIMIT = 10_000  # default rows returned by the SQL page


def store_root() -> Path:
    """The store the dashboard reads: ``$CHRONO_ROOT``, else ``./chrono_runs``."""
    return default_root().absolute()


# --------------------------------------------------------------- connection
class Store:
    """A read-only connection plus the follower that says what its views cover.

    DuckDB connections are not safe for concurrent use; Streamlit serves each
    browser session on its own thread, so every statement (and every poll of
    the follower) holds ``lock``.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.RLock()
        self.follower = Follower(self.root)
        self.follower.poll()  # before the views: what they cover is never older than the version
        with warnings.catch_warnings():   # a mistyped root: the welcome page says it
            warnings.simplefilter("ignore", UserWarning)
            self.con = chrono.connect(self.root, skip_invalid=True)   # see invalid_note()
        self.checked_at = time.monotonic()

    def sync(self, force: bool = False) -> None:
        """Rebuild the views if parts or manifests changed since the last look."""
        with self.lock:
            if not force and time.monotonic() - self.checked_at < CHECK_EVERY_S:
                return
            changed = self.follower.poll()
            self.checked_at = time.monotonic()
            if force or changed:
                chrono.refresh(self.con)

    def version(self, run: str | None) -> str:
        """Changes whenever anything the given run (or, for None, any run) reads changes."""
        with self.lock:
            return self.follower.version(run)

    def runs(self) -> set[str]:
        """The runs in the store at the last look."""
        with self.lock:
            return set(self.follower.runs())

    def fetch(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        with self.lock:
            return self.con.execute(sql, params or {}).df()


@st.cache_resource(show_spinner=False)
def _store(root: str) -> Store:
    return Store(Path(root))


def get_store(root: Path | None = None) -> Store:
    store = _store(str(root or store_root()))
    store.sync()
    return store


@st.cache_data(ttl=3600, max_entries=512, show_spinner=False)
def _cached(root: str, version: str, sql: str, params: tuple) -> pd.DataFrame:
    return _store(root).fetch(sql, dict(params))


def query(sql: str, run: str | None = None, root: Path | None = None, **params) -> pd.DataFrame:
    """Run one of the SQL constants below (cached until the run's data changes).

    ``run`` is bound as ``$run`` and decides which data version keys the cache.
    """
    store = get_store(root)
    if run is not None:
        params["run"] = run
    return _cached(str(store.root), store.version(run), sql, tuple(sorted(params.items())))


def invalid_note(run: str, root: Path | None = None) -> str | None:
    """One line naming table, step and layer of the run's first row the write API would refuse.

    Pages leave such rows out (the connection's views skip them, ``chrono.validate``);
    this says so. None when the run has none.
    """
    store = get_store(root)
    return _cached_invalid(str(store.root), store.version(run), run)


@st.cache_data(ttl=3600, max_entries=64, show_spinner=False)
def _cached_invalid(root: str, version: str, run: str) -> str | None:
    from chrono.schema import TABLES
    from chrono.rules import first_invalid

    store = _store(root)
    with store.lock:
        for t in TABLES:
            err = first_invalid(store.con, t, run, view=f"invalid_{t}")
            if err is not None:
                return f"{err} These rows are left out of every page."
    return None


def reload(root: Path | None = None) -> None:
    """Forget every cached result and rebuild the views now (the Reload button)."""
    _cached.clear()
    get_store(root).sync(force=True)


def bin_width(lo, hi, budget: int) -> int:
    """Steps per bin so that [lo, hi] fits in at most ``budget`` bins (>= 1)."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return 1
    return max(1, math.ceil((int(hi) - int(lo) + 1) / budget))


# ---------------------------------------------------------------------- SQL
# Queries other readers run too (RUNS_SQL, LATEST_SNAPSHOTS_SQL) live in chrono.queries.
# Global (layer -1) health of several runs, binned per run to the line budget.
COMPARE_SQL = """
WITH s AS (SELECT run_id, step, neff, n_experts, top2_share, dead FROM snapshots
           WHERE layer = -1 AND list_contains($runs, run_id)),
     r AS (SELECT run_id, min(step) AS lo, greatest(1, ceil((max(step) - min(step) + 1) / $budget))::BIGINT AS w
           FROM s GROUP BY run_id)
SELECT s.run_id, max(s.step) AS step, avg(s.neff) AS neff, avg(s.top2_share) AS top2_share,
       max(s.dead) AS dead, max(s.n_experts) AS n_experts
FROM s JOIN r USING (run_id)
GROUP BY s.run_id, (s.step - r.lo) // r.w ORDER BY s.run_id, step
"""

COMPARE_LOSS_SQL = """
WITH s AS (SELECT run_id, step, value FROM signals
           WHERE name = 'loss' AND layer IS NULL AND list_contains($runs, run_id)),
     r AS (SELECT run_id, min(step) AS lo, greatest(1, ceil((max(step) - min(step) + 1) / $budget))::BIGINT AS w
           FROM s GROUP BY run_id)
SELECT s.run_id, max(s.step) AS step, avg(s.value) AS loss
FROM s JOIN r USING (run_id)
GROUP BY s.run_id, (s.step - r.lo) // r.w ORDER BY s.run_id, step
"""

# One scan of a run's routing: per (layer, expert) totals. (min/max step are a separate,
# cheaper query: as aggregates here they made this scan 1.4x slower at 20 M rows.)
ROUTING_TOTALS_SQL = """
SELECT layer, expert, sum(tokens) AS tokens, sum(weight_sum) AS weight_sum, sum(dropped) AS dropped
FROM routing WHERE run_id = $run
GROUP BY layer, expert ORDER BY layer, expert
"""

ROUTING_RANGE_SQL = """
SELECT min(step) AS lo, max(step) AS hi FROM routing WHERE run_id = $run
"""

# Step x expert shares of one layer, steps binned to $w-wide columns starting at $lo.
ROUTING_HEATMAP_SQL = """
WITH b AS (
    SELECT $lo + ((step - $lo) // $w) * $w AS step_start, expert, sum(tokens) AS tokens
    FROM routing WHERE run_id = $run AND layer = $layer
    GROUP BY ALL)
SELECT step_start, step_start + $w AS step_end, expert, tokens,
       coalesce(tokens / nullif(sum(tokens) OVER (PARTITION BY step_start), 0), 0) AS share
FROM b ORDER BY step_start, expert
"""

# Per-token gate weights (only when the run recorded the optional tokens table).
TOKEN_WEIGHTS_SQL = """
SELECT k, least(floor(weight * $bins), $bins - 1) / $bins AS weight_bin, count(*) AS assignments
FROM tokens WHERE run_id = $run AND layer = $layer AND weight IS NOT NULL
GROUP BY ALL ORDER BY k, weight_bin
"""

SNAPSHOT_RANGE_SQL = """
SELECT min(step) AS lo, max(step) AS hi, count(DISTINCT step) AS windows,
       list(DISTINCT layer ORDER BY layer) AS layers
FROM snapshots WHERE run_id = $run
"""

# Health per layer over steps; bins of $w steps average the metrics, dead counts take the max.
HEALTH_SQL = """
SELECT layer, max(step) AS step, count(*) AS windows, max(n_experts) AS n_experts,
       avg(neff) AS neff, avg(top2_share) AS top2_share, avg(entropy) AS entropy,
       max(dead) AS dead, max(nearly_dead) AS nearly_dead, sum(token_count) AS token_count
FROM snapshots WHERE run_id = $run
GROUP BY layer, (step - $lo) // $w ORDER BY layer, step
"""

# Per-layer snapshot windows binned to the heatmap budget, for the layer x step health strip.
STRIP_SQL = """
SELECT layer, min(window_start) AS x_start, max(step) + 1 AS x_end, min(step) AS step_start,
       max(step) AS step_end, count(*) AS windows, max(n_experts) AS n_experts,
       avg(neff) AS neff, avg(top2_share) AS top2_share, max(dead) AS dead, max(nearly_dead) AS nearly_dead
FROM snapshots WHERE run_id = $run AND layer >= 0
GROUP BY layer, (step - $lo) // $w ORDER BY layer, step_start
"""

ALERTS_SQL = """
SELECT step, layer, alert, transition, consecutive, n_experts, token_count,
       neff, top2_share, dead
FROM alerts WHERE run_id = $run ORDER BY step, layer, alert, transition DESC
"""

DECISIONS_RANGE_SQL = """
SELECT min(step) AS lo, max(step) AS hi, count(*) AS decisions,
       list(DISTINCT layer ORDER BY layer) AS layers,
       list(DISTINCT actuator ORDER BY actuator) AS actuators
FROM decisions WHERE run_id = $run
"""

DECISIONS_SERIES_SQL = """
SELECT layer, actuator, min(step) AS step_start, max(step) AS step, count(*) AS decisions,
       avg(debt) AS debt, avg(pressure) AS pressure, avg(heat) AS heat,
       avg(forgetting) AS forgetting, avg(lens_scale) AS lens_scale, avg(backoff) AS backoff,
       avg(abstain::INT) AS abstain_fraction
FROM decisions WHERE run_id = $run
GROUP BY layer, actuator, (step - $lo) // $w ORDER BY layer, actuator, step
"""

# Reasons carry the values of the moment ("act: debt 0.412, pressure 0.200"): group by the text
# with its numbers masked, so one kind of reason is one row.
DECISION_REASONS_SQL = r"""
SELECT regexp_replace(coalesce(nullif(trim(reason), ''), '(no reason given)'),
                      '[-+]?\d+(\.\d+)?([eE][-+]?\d+)?', '#', 'g') AS kind,
       abstain, count(*) AS decisions, count(DISTINCT layer) AS layers,
       min(step) AS first_step, max(step) AS last_step, arg_max(reason, step) AS latest_example
FROM decisions WHERE run_id = $run GROUP BY ALL ORDER BY decisions DESC, kind
"""

DECISIONS_LATEST_SQL = """
SELECT step, layer, actuator, debt, pressure, heat, forgetting, lens_scale, backoff,
       abstain, reason, neff, top2_share
FROM decisions WHERE run_id = $run ORDER BY step DESC, layer LIMIT $limit
"""

LIFECYCLE_SQL = """
SELECT step, layer, event, expert, source_expert, n_experts_after, applied, reason
FROM lifecycle WHERE run_id = $run ORDER BY step, layer, event
"""

SIGNAL_NAMES_SQL = """
SELECT name, count(*) AS points, min(step) AS first_step, max(step) AS last_step,
       concat_ws(', ', CASE WHEN count(*) > count(layer) THEN 'run-wide' END,
                 nullif(array_to_string(list_sort(list_distinct(list(layer) FILTER (WHERE layer IS NOT NULL))), ', '), '')
                 ) AS layers   -- 'run-wide' (no layer), and/or the layers, e.g. '0, 2, 10'
FROM signals WHERE run_id = $run GROUP BY name ORDER BY name
"""

SIGNALS_SQL = """
WITH s AS (SELECT step, name, layer, value FROM signals
           WHERE run_id = $run AND list_contains($names, name) AND value IS NOT NULL),
     r AS (SELECT name, min(step) AS lo, greatest(1, ceil((max(step) - min(step) + 1) / $budget))::BIGINT AS w
           FROM s GROUP BY name)
SELECT s.name, s.layer, max(s.step) AS step, avg(s.value) AS value, count(*) AS points
FROM s JOIN r USING (name)
GROUP BY s.name, s.layer, (s.step - r.lo) // r.w ORDER BY s.name, s.layer, step
"""

# Examples of the SQL page; {run} is replaced by the selected run as a quoted literal (run ids are
# [A-Za-z0-9._-] only), so what runs is what the text box shows.
SQL_EXAMPLES: dict[str, str] = {
    "Runs (all)": "SELECT run_id, n_layers, n_experts, top_k, adapter, updated_at FROM runs",
    "Tokens per expert":
        "SELECT layer, expert, sum(tokens) AS tokens\nFROM routing\nWHERE run_id = {run}\n"
        "GROUP BY ALL ORDER BY ALL",
    "Latest health per layer":
        "SELECT layer, step, round(neff, 3) AS neff, n_experts, round(top2_share, 3) AS top2, dead\n"
        "FROM snapshots\nWHERE run_id = {run}\nQUALIFY step = max(step) OVER ()\nORDER BY layer",
    "Alerts raised": "SELECT step, layer, alert, neff, top2_share, dead\nFROM alerts\n"
                     "WHERE run_id = {run} AND transition = 'raised'\nORDER BY step, layer",
    "Controller decisions": "SELECT step, layer, actuator, debt, pressure, lens_scale, abstain, reason\n"
                            "FROM decisions\nWHERE run_id = {run}\nORDER BY step DESC, layer LIMIT 100",
    "Signals": "SELECT name, count(*) AS points, min(value), max(value)\nFROM signals\n"
               "WHERE run_id = {run}\nGROUP BY ALL",
}


def sql_example(name: str, run: str | None) -> str:
    """The example's SQL for ``run`` (all runs when None: the filter is dropped)."""
    sql = SQL_EXAMPLES[name]
    if run is None:
        return sql.replace("WHERE run_id = {run} AND ", "WHERE ").replace("WHERE run_id = {run}\n", "")
    return sql.replace("{run}", "'" + run.replace("'", "''") + "'")


# ---------------------------------------------------------------- loaders
def runs() -> pd.DataFrame:
    """One row per run, newest first, with model name, run-level counts and health.

    Health columns (``chrono.health``): ``health`` (OK / PRE_COLLAPSE / COLLAPSE_CONFIRMED),
    ``severity`` (0-2), ``worst_layer`` (None when OK), ``layers_alerting``.
    """
    df = query(RUNS_SQL)
    health = health_of(query(ACTIVE_ALERTS_SQL).to_dict("records"))
    df["model_name"] = [(_json(m) or {}).get("name") for m in df["model"]] if len(df) else []
    got = [health.get(r) for r in df["run_id"]]
    df["health"] = [h.status if h else "OK" for h in got]
    df["severity"] = [h.severity if h else 0 for h in got]
    df["worst_layer"] = pd.array([h.worst_layer if h else None for h in got], dtype="Int64")
    df["layers_alerting"] = [len({l for l, _ in h.active}) if h else 0 for h in got]
    return df


def _json(s):
    try:
        return json.loads(s) if isinstance(s, str) else None
    except ValueError:
        return None


def run_set(root: Path | None = None) -> set[str]:
    """The runs in the store now, from the follower ``sync`` polls (stat calls, no SQL)."""
    return get_store(root).runs()


def control_config(run: str, root: Path | None = None) -> dict:
    """The run's ``control_config.json`` (mode, set point, actuator label; what ``chrono replay``
    uses); {} when absent or unreadable (the faithful policy then, as replay assumes)."""
    from chrono.controller import CONFIG_NAME
    from chrono.store import run_meta_dir

    d = run_meta_dir(root or store_root(), run)
    try:
        return json.loads((d / CONFIG_NAME).read_text()) if d is not None else {}
    except (OSError, ValueError):
        return {}


def run_ids() -> list[str]:
    """Run ids, newest first (cheap: one cached query keyed on the store's version)."""
    return list(query(RUNS_SQL)["run_id"])


def sql_console(sql: str, limit: int, root: Path | None = None):
    """Run a user's read-only SQL (Arrow table) or raise ``chrono.QueryError``."""
    from chrono.reader import run_readonly_sql

    store = get_store(root)
    with store.lock:
        return run_readonly_sql(store.con, sql, limit=limit)
