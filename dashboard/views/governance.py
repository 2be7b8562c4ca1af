"""Governance: what the controller decided, from which debt and pressure, and why."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, ui

st.title("Governance")
run = ui.need_run()


@ui.live
def body():
    rng = data.query(data.DECISIONS_RANGE_SQL, run=run)
    if rng.empty or not rng["decisions"].iloc[0]:
        ui.empty_note("controller decisions", "They appear when the run is governed by the controller "
                      "(decisions are logged to the `decisions` table at every snapshot).")
        return
    lo, hi = int(rng["lo"].iloc[0]), int(rng["hi"].iloc[0])
    layers = [int(x) for x in rng["layers"].iloc[0]]
    actuators = list(rng["actuators"].iloc[0])
    latest = data.query(data.DECISIONS_LATEST_SQL, run=run, limit=500)
    last = latest[latest["step"] == latest["step"].max()]
    c = st.columns(5)
    c[0].metric("Decisions", ui.fmt_int(rng["decisions"].iloc[0]))
    c[1].metric("Latest step", ui.fmt_int(hi))
    c[2].metric("Max pressure now", ui.fmt_float(last["pressure"].max()))
    c[3].metric("Max lens scale now", ui.fmt_float(last["lens_scale"].max(), 4))
    c[4].metric("Abstaining now", f"{int(last['abstain'].sum())} of {len(last)}")

    cols = st.columns(2)
    shown = cols[0].multiselect("Layers", layers, default=layers[: min(8, len(layers))],
                                format_func=charts.layer_label, key="gov_layers")
    actuator = cols[1].selectbox("Actuator", actuators, key="gov_actuator") if len(actuators) > 1 else actuators[0]
    w = data.bin_width(lo, hi, data.LINE_POINTS)
    s = data.query(data.DECISIONS_SERIES_SQL, run=run, lo=lo, w=w)
    s = s[s["layer"].isin(shown) & (s["actuator"] == actuator)].copy()
    s["layer_name"] = [charts.layer_label(l) for l in s["layer"]]
    if s.empty:
        st.caption("Pick at least one layer.")
    else:
        left, right = st.columns(2)
        left.altair_chart(charts.multi_line(s, "debt", "layer_name", "Topology debt", "debt (0-1)", "layer",
                                            y_domain=[0, 1]), width="stretch")
        right.altair_chart(charts.multi_line(s, "pressure", "layer_name", "Pressure (EMA of debt)",
                                             "pressure (0-1)", "layer", y_domain=[0, 1]), width="stretch")
        left, right = st.columns(2)
        left.altair_chart(charts.multi_line(s, "heat", "layer_name", "Heat (pressure clipped to 0-1)",
                                            "heat (0-1)", "layer", y_domain=[0, 1]), width="stretch")
        right.altair_chart(charts.multi_line(s, "lens_scale", "layer_name", "Lens scale s",
                                             "lens scale", "layer"), width="stretch")
        left, right = st.columns(2)
        left.altair_chart(charts.multi_line(s, "backoff", "layer_name", "Harm-guard backoff",
                                            "backoff (0-1)", "layer", y_domain=[0, 1]), width="stretch")
        right.altair_chart(charts.multi_line(s, "abstain_fraction", "layer_name", "Abstaining (share of decisions)",
                                             "abstained", "layer", y_format=".0%",
                                             y_domain=[0, 1]), width="stretch")
        if w > 1:
            st.caption(f"Each point averages the decisions of {w:,} steps.")

    st.subheader("Reasons")
    st.dataframe(data.query(data.DECISION_REASONS_SQL, run=run), hide_index=True)
    st.subheader("Latest decisions")
    st.dataframe(latest, hide_index=True, column_config={
        c: st.column_config.NumberColumn(format="%.4f")
        for c in ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff", "neff", "top2_share")})
    st.caption("Newest 500 decisions; every one is in the `decisions` table (SQL page).")


body()
