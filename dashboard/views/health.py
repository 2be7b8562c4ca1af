"""Health: alert state per layer, Neff, Top-2, entropy and dead experts, with alert thresholds."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import charts, data, status, ui

st.title("Health")
run = ui.need_run()


def _cards(latest: pd.DataFrame) -> None:
    steps = sorted(latest["step"].unique())
    now = latest[(latest["step"] == steps[-1]) & (latest["layer"] == -1)]
    before = latest[(latest["step"] == steps[0]) & (latest["layer"] == -1)] if len(steps) > 1 else None
    if now.empty:
        return
    g = now.iloc[0]
    layers = latest[(latest["step"] == steps[-1]) & (latest["layer"] >= 0)]
    n_layers = max(1, len(layers))

    def delta(col, fmt, up_is_bad=False):
        if before is None or before.empty:
            return {}
        return ui.delta(g[col] - before.iloc[0][col], fmt, up_is_bad)

    since = "change since the previous snapshot"
    c = st.columns(5)
    c[0].metric("Snapshot step", ui.fmt_int(g["step"]))
    c[1].metric("Neff (mean over layers)", f"{g['neff']:.2f} of {g['n_experts'] / n_layers:g}",
                help=f"Effective number of experts exp(entropy); {since}.",
                **delta("neff", lambda d: f"{d:+.2f}"))
    c[2].metric("Top-2 share (mean)", f"{g['top2_share']:.1%}", help=f"Share of the two busiest experts; {since}.",
                **delta("top2_share", lambda d: f"{d * 100:+.1f} pp", up_is_bad=True))
    c[3].metric("Dead experts (all layers)", ui.fmt_int(g["dead"]), help=f"Experts with no token; {since}.",
                **delta("dead", lambda d: f"{d:+.0f}", up_is_bad=True))
    c[4].metric("Nearly dead (< 1 %)", ui.fmt_int(g["nearly_dead"]), help=f"0 < share < 1 %; {since}.",
                **delta("nearly_dead", lambda d: f"{d:+.0f}", up_is_bad=True))


@ui.live
def body():
    rng = data.query(data.SNAPSHOT_RANGE_SQL, run=run)
    if rng.empty or pd.isna(rng["lo"].iloc[0]):
        ui.empty_note("snapshots", "Probes write one every `flush_every` steps; for a run that only has "
                      f"routing rows run `chrono snapshot {run} --every 10`.")
        return
    lo, hi = int(rng["lo"].iloc[0]), int(rng["hi"].iloc[0])
    all_layers = [int(x) for x in rng["layers"].iloc[0]]
    _cards(data.query(data.LATEST_SNAPSHOTS_SQL, run=run, windows=2))

    per_layer = [l for l in all_layers if l >= 0]
    alerts_all = data.query(data.ALERTS_SQL, run=run)
    if per_layer:
        ws = data.bin_width(lo, hi, data.STEP_BINS)
        strip = status.state_strip(data.query(data.STRIP_SQL, run=run, lo=lo, w=ws),
                                   status.active_spans(alerts_all, hi))
        st.altair_chart(charts.health_strip(strip), width="stretch")

    default = per_layer if len(per_layer) <= 8 else per_layer[:8]
    shown = st.multiselect("Layers", all_layers, default=default, format_func=charts.layer_label,
                           key="health_layers", help="'global (mean)' is the mean over layers with traffic")
    if not shown:
        st.caption("Pick at least one layer.")
        return
    w = data.bin_width(lo, hi, data.LINE_POINTS)
    h = data.query(data.HEALTH_SQL, run=run, lo=lo, w=w)
    h = h[h["layer"].isin(shown)].copy()
    h["layer_name"] = [charts.layer_label(l) for l in h["layer"]]
    alerts = alerts_all[alerts_all["layer"].isin(shown)]
    n_values = h.loc[h["layer"] >= 0, "n_experts"].unique().tolist()

    left, right = st.columns(2)
    left.altair_chart(charts.health_chart(
        h, "neff", "Effective experts (Neff = exp(entropy))", "Neff (experts)",
        charts.neff_thresholds(n_values) if len(n_values) <= 3 else [], alerts), width="stretch")
    right.altair_chart(charts.health_chart(
        h, "top2_share", "Top-2 share (tokens in the 2 largest experts)", "Top-2 share",
        charts.TOP2_THRESHOLDS, alerts, y_domain=[0, 1]), width="stretch")
    left, right = st.columns(2)
    left.altair_chart(charts.health_chart(
        h, "entropy", "Routing entropy", "entropy (nats)", [], alerts), width="stretch")
    dead = h[h["layer"] >= 0].melt(id_vars=["step", "layer", "layer_name", "n_experts"],
                                   value_vars=["dead", "nearly_dead"], var_name="kind", value_name="experts")
    dead["kind"] = dead["kind"].map({"dead": "dead (share = 0)", "nearly_dead": "nearly dead (< 1 %)"})
    if not dead.empty:
        right.altair_chart(charts.dead_small_multiples(dead, columns=2 if len(shown) > 1 else 1,
                                                       panel_height=110 if len(shown) > 2 else 240),
                           width="content")
    binned = f" Each point averages up to {int(h['windows'].max())} snapshots (dead: max)." if w > 1 else ""
    st.caption(f"Snapshots from step {lo:,} to {hi:,}. Strip: the worst alert state of each layer in each "
               "column. Lines: one colour per layer (never orange or red, which mean alerts); dashed "
               "horizontal lines are alert thresholds; dotted vertical lines mark alerts raised, labelled "
               f"with their layers (orange PRE_COLLAPSE, red COLLAPSE_CONFIRMED).{binned}")

body()
