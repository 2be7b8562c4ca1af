"""Cached loaders for the Specialization page: chrono.analysis results per run version.

Same rules as ``dashboard.data``: one read-only connection per store (held under
its lock while an analysis runs), results kept with ``st.cache_data`` keyed by
the run's data version (so they are recomputed only when new parts land), and
nothing big sent to the browser (drift over at most ``DRIFT_WINDOWS`` windows;
co-activation of at most ``MAX_HEATMAP_EXPERTS`` experts, the busiest ones).
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import data

DRIFT_WINDOWS = 20
MAX_HEATMAP_EXPERTS = 64


@st.cache_data(ttl=3600, max_entries=128, show_spinner=False)
def _analysis(root: str, version: str, run: str, kind: str, options: tuple):
    """(rows DataFrame, summary, notes) or (None, error message, [])."""
    from chrono.analysis import AnalysisError, Scope, analyze

    store = data._store(root)
    opts = dict(options)
    layer = opts.pop("layer", None)
    with store.lock:
        try:
            res = analyze(store.con, kind, Scope(run, layer=layer), **opts)
        except AnalysisError as e:
            return None, str(e), []
    return res.table.to_pandas(), res.summary, res.notes


def analysis(run: str, kind: str, **options):
    """Run ``chrono.analysis`` ``kind`` over the whole run (cached until the run changes)."""
    store = data.get_store()
    return _analysis(str(store.root), store.version(run), run, kind, tuple(sorted(options.items())))


@st.cache_data(ttl=3600, max_entries=64, show_spinner=False)
def _placement(root: str, version: str, run: str, gpus: int, replicas: int):
    from chrono.analysis import AnalysisError, Scope
    from chrono.analysis.placement_io import plan_run

    store = data._store(root)
    with store.lock:
        try:
            rep = plan_run(store.con, Scope(run), gpus, replicas=replicas)
        except AnalysisError as e:
            return None, str(e)
    return rep.table().to_pandas(), rep.summary()


def placement(run: str, gpus: int, replicas: int):
    store = data.get_store()
    return _placement(str(store.root), store.version(run), run, int(gpus), int(replicas))


@st.cache_data(ttl=3600, max_entries=64, show_spinner=False)
def _labels(root: str, version: str, run: str, ids: tuple) -> dict:
    from chrono.analysis.labels import token_labeler

    store = data._store(root)
    with store.lock:
        label = token_labeler(store.con, run)
    return {} if label is None else {i: label(i) for i in ids}


def token_labels(run: str, ids) -> dict:
    """{token id: text} when the run is byte-level or names a tokenizer file; else {}."""
    store = data.get_store()
    return _labels(str(store.root), store.version(run), run, tuple(sorted({int(i) for i in ids})))


def coactivation_cells(df: pd.DataFrame, layer: int) -> pd.DataFrame:
    """Both triangles of one layer's pairs (a heatmap cell per ordered pair), busiest experts only."""
    d = df[df["layer"] == layer]
    tokens = pd.concat([d[["expert_a", "tokens_a"]].set_axis(["expert", "n"], axis=1),
                        d[["expert_b", "tokens_b"]].set_axis(["expert", "n"], axis=1)])
    busiest = tokens.groupby("expert")["n"].max().nlargest(MAX_HEATMAP_EXPERTS).index
    d = d[d["expert_a"].isin(busiest) & d["expert_b"].isin(busiest)]
    flipped = d.rename(columns={"expert_a": "expert_b", "expert_b": "expert_a",
                                "tokens_a": "tokens_b", "tokens_b": "tokens_a"})
    return pd.concat([d, flipped], ignore_index=True)
