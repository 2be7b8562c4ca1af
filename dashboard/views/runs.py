"""Runs: every run in the store, and several side by side."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from chrono.health import STATUSES
from chrono.snapshots import RULE_TEXT
from dashboard import charts, data, status, ui

st.title("Runs")


def _ago(ts) -> str:
    if ts is None or pd.isna(ts):
        return "–"
    secs = (datetime.now(timezone.utc).replace(tzinfo=None) - pd.Timestamp(ts).to_pydatetime()).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= n:
            return f"{secs / n:.0f} {unit} ago"
    return f"{max(secs, 0):.0f} s ago"


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The Runs table: one row per run, health first, '–' where a run has nothing to say."""
    def text(v):
        return "–" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)

    return pd.DataFrame({
        "run": runs["run_id"],
        "health": runs["health"],
        "worst layer": [f"layer {int(l)}" if pd.notna(l) else "–" for l in runs["worst_layer"]],
        "alerting layers": runs["layers_alerting"],
        "model": [text(m) if text(m) != "–" else "(not described)" for m in runs["model_name"]],
        "layers × experts": [(f"{ui.fmt_int(l)} × {ui.fmt_int(e)}" + (f", top-{int(k)}" if pd.notna(k) else ""))
                             if pd.notna(l) else "–" for l, e, k in zip(runs["n_layers"], runs["n_experts"],
                                                                        runs["top_k"])],
        "steps": runs["steps"].fillna(0).astype("int64"),
        "tokens routed": runs["tokens"].fillna(0).astype("int64"),
        "alerts raised": runs["alerts_raised"],
        "updated": [_ago(t) for t in runs["updated_at"]],
    })


@ui.live
def body():
    runs = data.runs()
    counts = runs["health"].value_counts()
    c = st.columns(5)
    c[0].metric("Runs", len(runs))
    c[1].metric("Collapse confirmed", int(counts.get("COLLAPSE_CONFIRMED", 0)),
                help=f"Runs with a COLLAPSE_CONFIRMED alert active now ({RULE_TEXT['COLLAPSE_CONFIRMED']}, "
                     "in some layer).")
    c[2].metric("Pre-collapse", int(counts.get("PRE_COLLAPSE", 0)),
                help=f"Runs whose worst active alert is PRE_COLLAPSE ({RULE_TEXT['PRE_COLLAPSE']}).")
    c[3].metric("Alerts raised (all runs)", ui.fmt_int(runs["alerts_raised"].sum()))
    c[4].metric("Routing steps (all runs)", ui.fmt_int(runs["steps"].fillna(0).sum()))

    left, right = st.columns([3, 2])
    keep = left.pills("Health", list(STATUSES), default=list(STATUSES), selection_mode="multi",
                      key="runs_health_filter", help="Show runs in these states (their worst active alert).")
    order = right.segmented_control("Order", ["worst health first", "newest first"],
                                    default="worst health first", key="runs_order")
    shown = runs[runs["health"].isin(keep or [])]
    if order != "newest first":  # stable: newest first within each state
        shown = shown.sort_values("severity", ascending=False, kind="stable")
    table = run_table(shown)
    st.dataframe(table.style.apply(status.health_cell_styles, subset=["health"]), hide_index=True, column_config={
        "health": st.column_config.TextColumn(
            "health", help="OK, PRE_COLLAPSE or COLLAPSE_CONFIRMED: the run's most severe alert active now"),
        "worst layer": st.column_config.TextColumn(
            help="The layer holding that alert (several: the one whose alert fired at the lowest Neff / n)"),
        "tokens routed": st.column_config.NumberColumn(format="localized"),
        "updated": st.column_config.TextColumn(help="Time since the run's manifest was last written (UTC clock)"),
    })
    if len(shown) < len(runs):
        st.caption(f"{len(runs) - len(shown)} of {len(runs)} runs hidden by the health filter.")

    st.subheader("Compare runs")
    ids = list(runs["run_id"])
    chosen = st.multiselect("Runs to compare", ids, default=ids[: min(3, len(ids))], key="compare_runs",
                            help="Global health (mean over layers) of each run over its steps.")
    if not chosen:
        st.caption("Pick one or more runs.")
        return
    health = data.query(data.COMPARE_SQL, runs=chosen, budget=data.LINE_POINTS)
    if health.empty:
        ui.empty_note("snapshots", "Health appears once snapshots are written "
                      "(probes do it every flush; or run `chrono snapshot RUN --every K`).")
    else:
        health["neff_fraction"] = health["neff"] / (health["n_experts"].clip(lower=1))
        left, right = st.columns(2)
        left.altair_chart(charts.multi_line(health, "neff_fraction", "run_id", "Neff / experts (mean over layers)",
                                            "Neff ÷ experts", "run", y_format=".0%",
                                            y_domain=[0, 1]), width="stretch")
        right.altair_chart(charts.multi_line(health, "top2_share", "run_id", "Top-2 share (mean over layers)",
                                             "Top-2 share", "run", y_format=".0%",
                                             y_domain=[0, 1]), width="stretch")
    loss = data.query(data.COMPARE_LOSS_SQL, runs=chosen, budget=data.LINE_POINTS)
    if not loss.empty:
        st.altair_chart(charts.multi_line(loss, "loss", "run_id", "Training loss", "loss (nats)", "run"),
                        width="stretch")


body()
