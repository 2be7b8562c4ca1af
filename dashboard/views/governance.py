"""Governance: what the controller decided, from which debt and pressure, and why."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, status, ui

st.title("Governance")
run = ui.need_run()

# What each controller term means (DESIGN §4, chrono.controller.policy), shown as help tooltips.
TERMS = {
    "debt": "Topology debt, 0-1: how far the layer's routing is from healthy in the latest snapshot. "
            "0.4·clip((0.6n − Neff)/0.6n) + 0.4·clip((Top-2 − 0.75)/0.25) + 0.2·clip(dead/(n−1)). "
            "0 = healthy (Neff ≥ 0.6·n, Top-2 ≤ 0.75, no dead expert).",
    "pressure": "Pressure, 0-1: a slow average of debt, pressure ← 0.8·pressure + 0.2·debt, so one bad "
                "snapshot does not make the controller act. It sets how hard the actuator pushes.",
    "heat": "Heat = pressure clipped to 0-1 (the same number under this policy). The temperature actuator "
            "reads it to soften the router's softmax; lens actuators read pressure.",
    "lens scale": "Lens scale s: the strength applied to the layer's routing lens this step, "
                  "min(pressure, 0.5) capped at s_max (0.02 before step 100, 0.5 after) × backoff. "
                  "0 = the lens is an exact identity.",
    "backoff": "Harm-guard backoff, 0-1: multiplies the lens scale. Halves when Top-2 rose by more than "
               "0.02 after the controller acted (it made things worse); recovers by 0.2·(1 − backoff) "
               "otherwise. Below 0.15 the controller abstains.",
    "abstain": "Abstaining: the controller decided not to act (scale 0), because the layer is healthy "
               "(pressure < 0.01), the harm guard tripped (backoff < 0.15) or the window had no traffic.",
}


# One line under each heading; the tooltip (TERMS) has the formula.
GLOSS = {
    "debt": "how unhealthy the layer's routing is now (0 = healthy, 1 = one expert takes all)",
    "pressure": "debt averaged over recent snapshots: how hard the controller pushes",
    "heat": "pressure clipped to 0-1; softens the router when the temperature actuator is on",
    "lens scale": "strength of the routing lens the controller applied (0 = no change)",
    "backoff": "harm guard: drops when acting made routing worse, then recovers",
    "abstain": "steps where the controller chose not to act",
}


SERIES_CHARTS = [
    ("Topology debt", "debt", "debt", "Topology debt", "debt (0-1)", [0, 1]),
    ("Pressure", "pressure", "pressure", "Pressure (EMA of debt)", "pressure (0-1)", [0, 1]),
    ("Heat", "heat", "heat", "Heat (pressure clipped to 0-1)", "heat (0-1)", [0, 1]),
    ("Lens scale", "lens scale", "lens_scale", "Lens scale s", "lens scale", None),
    ("Backoff", "backoff", "backoff", "Harm-guard backoff", "backoff (0-1)", [0, 1]),
]


SETPOINT_PRESSURE = ("Effort u", "the PI controller's output, 0-1: how hard the actuators push "
                     "(stored in the pressure column)", "Effort u (PI output, stored as pressure)", "effort u (0-1)")


def term(label: str, key: str, gloss: str | None = None) -> None:
    """The term in bold with a one-line gloss; hover the (?) for the formula."""
    st.markdown(f"**{label}**: {gloss or GLOSS[key]}", help=TERMS[key])


def governed_by(actuators: list[str], cfg: dict) -> str:
    """One line: which actuators and which policy (``control_config.json``; none: faithful)."""
    who = f"Governed by **{', '.join(actuators)}**"
    if cfg.get("mode") == "setpoint":
        target = cfg.get("neff_target", 0.8)
        return (f"{who} · setpoint policy: PI feedback to Neff = {target}·n per layer; the pressure column "
                "holds the PI effort u (0-1) the actuators consume, not an average of debt.")
    return f"{who} · faithful policy (ChronoMoE): debt → pressure → lens scale, with a harm guard."


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
    cfg = data.control_config(run)
    setpoint = cfg.get("mode") == "setpoint"
    st.caption(governed_by(actuators, cfg))
    latest = data.query(data.DECISIONS_LATEST_SQL, run=run, limit=500)
    last = latest[latest["step"] == latest["step"].max()]
    c = st.columns(5)
    c[0].metric("Decisions", ui.fmt_int(rng["decisions"].iloc[0]),
                help="One per layer per snapshot, all in the `decisions` table.")
    c[1].metric("Latest step", ui.fmt_int(hi))
    c[2].metric("Max effort u now" if setpoint else "Max pressure now", ui.fmt_float(last["pressure"].max()),
                help=SETPOINT_PRESSURE[1] if setpoint else TERMS["pressure"])
    c[3].metric("Max lens scale now", ui.fmt_float(last["lens_scale"].max(), 4), help=TERMS["lens scale"])
    c[4].metric("Abstaining now", f"{int(last['abstain'].sum())} of {len(last)}",
                help="Layers whose latest decision was to abstain. " + TERMS["abstain"])

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
        # (heading, TERMS key, column, chart title, y title, y domain); abstention is drawn as a band
        for i, (label, key, col, title, y_title, dom) in enumerate(SERIES_CHARTS):
            gloss = None
            if setpoint and key == "pressure":
                label, gloss, title, y_title = SETPOINT_PRESSURE
            if i % 2 == 0:
                cols = st.columns(2)
            with cols[i % 2]:
                term(label, key, gloss)
                st.altair_chart(charts.multi_line(s, col, "layer_name", title, y_title, "layer", y_domain=dom),
                                width="stretch")
        with cols[1]:
            term("Abstaining", "abstain")
            st.altair_chart(charts.abstain_band(status.decision_spans(s)), width="stretch")
        if w > 1:
            st.caption(f"Each point averages the decisions of {w:,} steps.")

    st.subheader("Reasons", help="Why the controller acted or abstained, grouped by kind: the reason text "
                 "with its numbers replaced by #, so 'act: debt 0.41, pressure 0.20' and 'act: debt 0.52, "
                 "pressure 0.26' are one kind.")
    reasons = data.query(data.DECISION_REASONS_SQL, run=run)
    total = max(1, int(reasons["decisions"].sum()))
    reasons.insert(3, "share", reasons["decisions"] / total)
    st.dataframe(reasons, hide_index=True, width="stretch", column_config={
        "kind": st.column_config.TextColumn("kind of reason", width="medium"),
        "abstain": st.column_config.CheckboxColumn("abstained"),
        "share": st.column_config.ProgressColumn("share of decisions", format="percent", min_value=0,
                                                 max_value=1),
        "latest_example": st.column_config.TextColumn("latest example", width="large"),
    })
    st.subheader("Latest decisions")
    latest = latest[["step", "layer", "actuator", "abstain", "reason", "debt", "pressure", "lens_scale", "backoff",
                     "neff", "top2_share"]]  # heat = pressure here; both in the SQL table
    if latest["actuator"].nunique() <= 1:  # named in the caption at the top; room for the numbers
        latest = latest.drop(columns=["actuator"])
    st.dataframe(latest, hide_index=True, width="stretch", column_config={
        "step": st.column_config.NumberColumn(width="small"),
        "layer": st.column_config.NumberColumn(width="small"),
        "actuator": st.column_config.TextColumn(width="small"),
        **{c: st.column_config.NumberColumn(format="%.3f", width="small", help=TERMS.get(c.replace("_", " ")))
           for c in ("debt", "pressure", "heat", "forgetting", "lens_scale", "backoff", "neff", "top2_share")},
        "abstain": st.column_config.CheckboxColumn(width="small", help=TERMS["abstain"]),
        "reason": st.column_config.TextColumn(width="medium"),
    })
    st.caption("Newest 500 decisions; every one, with heat and forgetting (0.02 + 0.10·pressure, logged "
               "for ChronoMoE compatibility only), is in the `decisions` table (SQL page).")


body()
