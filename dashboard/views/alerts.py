"""Alerts: when each layer's alerts were raised and cleared, and the values that triggered them."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from chrono.snapshots import RULE_TEXT
from dashboard import charts, data, status, ui

st.title("Alerts")
run = ui.need_run()


@ui.live
def body():
    alerts = data.query(data.ALERTS_SQL, run=run)
    rng = data.query(data.SNAPSHOT_RANGE_SQL, run=run)
    if alerts.empty:
        if rng.empty or pd.isna(rng["lo"].iloc[0]):
            ui.empty_note("alerts", f"Alerts are computed with snapshots; run `chrono snapshot {run} --every 10` "
                          "for a run that only has routing rows.")
        else:
            st.success(f"No alert was ever raised in this run ({int(rng['windows'].iloc[0]):,} snapshots "
                       "checked): every layer stayed within PRE_COLLAPSE and COLLAPSE_CONFIRMED limits.")
        return
    last_step = int(rng["hi"].iloc[0]) if not rng.empty and not pd.isna(rng["hi"].iloc[0]) else int(alerts["step"].max())
    spans = status.active_spans(alerts, last_step)
    spans["layer_name"] = [charts.layer_label(l) for l in spans["layer"]]
    active = spans[spans["open"]]
    c = st.columns(4)
    raised = alerts[alerts["transition"] == "raised"]
    c[0].metric("Raised", len(raised))
    c[1].metric("Cleared", int((alerts["transition"] == "cleared").sum()))
    c[2].metric("Active now", len(active))
    c[3].metric("First raised at step", ui.fmt_int(raised["step"].min()) if len(raised) else "–")
    if len(active):
        st.warning("Active now: " + ", ".join(f"{charts.layer_label(r.layer)} {r.alert} (since step {r.start:,})"
                                               for r in active.sort_values(["layer", "alert"]).itertuples()))
    alerts = alerts.copy()
    alerts["layer_name"] = [charts.layer_label(l) for l in alerts["layer"]]
    n_rows = alerts["layer"].nunique()
    st.altair_chart(charts.alert_timeline(alerts, spans, height=130 + 48 * n_rows), width="stretch")

    kinds = st.multiselect("Show", ["raised", "cleared"], default=["raised", "cleared"], key="alert_kinds")
    table = alerts[alerts["transition"].isin(kinds)].drop(columns=["layer_name"])
    st.dataframe(table, hide_index=True, column_config={
        "step": st.column_config.NumberColumn("snapshot step"),
        "consecutive": st.column_config.NumberColumn("consecutive snapshots", help="how long the condition held"),
        "n_experts": st.column_config.NumberColumn("experts"),
        "token_count": st.column_config.NumberColumn("tokens in window", format="localized"),
        "neff": st.column_config.NumberColumn("Neff", format="%.3f"),
        "top2_share": st.column_config.NumberColumn("Top-2 share", format="%.3f"),
        "dead": st.column_config.NumberColumn("dead experts"),
    })
    st.caption(f"PRE_COLLAPSE: {RULE_TEXT['PRE_COLLAPSE']}. "
               f"COLLAPSE_CONFIRMED: {RULE_TEXT['COLLAPSE_CONFIRMED']}. Values are those of the "
               "snapshot at the transition.")


body()
