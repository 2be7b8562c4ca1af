"""Runs: every run in the store, and several side by side."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui

st.title("Runs")


def _ago(ts) -> str:
    if ts is None or pd.isna(ts):
        return "–"
    secs = (datetime.now(timezone.utc).replace(tzinfo=None) - pd.Timestamp(ts).to_pydatetime()).total_seconds()
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= n:
            return f"{secs / n:.0f} {unit} ago"
    return f"{max(secs, 0):.0f} s ago"


@ui.live
def body():
    runs = data.runs()
    c = st.columns(4)
    c[0].metric("Runs", len(runs))
    c[1].metric("Routing steps (all runs)", ui.fmt_int(runs["steps"].fillna(0).sum()))
    c[2].metric("Alerts raised (all runs)", ui.fmt_int(runs["alerts_raised"].sum()))
    c[3].metric("Alerts active now", ui.fmt_int(runs["alerts_active"].sum()))

    table = pd.DataFrame({
        "run": runs["run_id"],
        "model": runs["model_name"],
        "layers × experts": [f"{ui.fmt_int(l)} × {ui.fmt_int(e)}" for l, e in zip(runs["n_layers"], runs["n_experts"])],
        "top-k": runs["top_k"],
        "steps": runs["steps"],
        "last step": runs["last_step"],
        "tokens routed": runs["tokens"],
        "alerts raised": runs["alerts_raised"],
        "alerts active": runs["alerts_active"],
        "last update (UTC)": runs["updated_at"],
        "updated": [_ago(t) for t in runs["updated_at"]],
    })
    st.dataframe(table, hide_index=True, column_config={
        "tokens routed": st.column_config.NumberColumn(format="localized"),
        "last update (UTC)": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
    })

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
