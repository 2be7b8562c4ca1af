"""Routing: where the tokens of the selected run went, per layer and expert."""
from __future__ import annotations

import streamlit as st

from dashboard import charts, data, ui

st.title("Routing")
run = ui.need_run()


@ui.live
def body():
    totals = data.query(data.ROUTING_TOTALS_SQL, run=run)
    if totals.empty:
        ui.empty_note("routing rows", "They appear at the first flush of a run recorded with "
                      "`probes.attach(...)` or `RunWriter.log_routing(...)`.")
        return
    layers = sorted(int(l) for l in totals["layer"].unique())
    rng = data.query(data.ROUTING_RANGE_SQL, run=run)
    lo, hi = int(rng["lo"].iloc[0]), int(rng["hi"].iloc[0])
    n_exp = int(totals["expert"].max()) + 1
    total_tokens = int(totals["tokens"].sum())
    dropped = int(totals["dropped"].sum())
    c = st.columns(4)
    c[0].metric("Steps", f"{lo:,} – {hi:,}")
    c[1].metric("Layers × experts", f"{len(layers)} × {n_exp}")
    c[2].metric("Token assignments", ui.fmt_int(total_tokens))
    c[3].metric("Dropped (capacity)", f"{dropped / max(1, total_tokens + dropped):.2%}",
                help="assignments routed to an expert but dropped, of all routed")

    layer = st.selectbox("Layer", layers, format_func=charts.layer_label, key="routing_layer")
    w = data.bin_width(lo, hi, data.STEP_BINS)
    heat = data.query(data.ROUTING_HEATMAP_SQL, run=run, layer=layer, lo=lo, w=w)
    n_layer = int(totals.loc[totals["layer"] == layer, "expert"].max()) + 1
    st.altair_chart(charts.share_heatmap(heat, layer, height=170 + min(1400, 22 * n_layer),
                                         n_experts=n_layer), width="stretch")
    st.caption(f"{heat['step_start'].nunique():,} columns of {w:,} step{'s' if w > 1 else ''} each; "
               "colour = the expert's share of the layer's token assignments in that column, on a fixed "
               f"scale: white is the uniform share 1/{n_layer} = {1 / n_layer:.1%} (perfect balance), blue "
               "below it (starved, dead experts darkest), purple above it up to 100 % (one expert takes all). "
               "A healthy layer is pale throughout; a collapsing one turns dark.")

    totals["share"] = totals["tokens"] / totals.groupby("layer")["tokens"].transform("sum").clip(lower=1)
    totals["mean_weight"] = totals["weight_sum"] / totals["tokens"].where(totals["tokens"] > 0)
    left, right = st.columns(2)
    left.altair_chart(charts.layer_expert_heatmap(totals, height=190 + min(520, 36 * len(layers))),
                      width="stretch")
    weights = data.query(data.TOKEN_WEIGHTS_SQL, run=run, layer=layer, bins=20)
    if not weights.empty:
        weights["weight_end"] = weights["weight_bin"] + 0.05
        right.altair_chart(charts.token_weight_hist(weights, layer), width="stretch")
        right.caption("From the per-token table (sampled tokens only).")
    elif totals["mean_weight"].notna().any():
        right.altair_chart(charts.expert_weight_bars(totals[totals["layer"] == layer], layer), width="stretch")
        right.caption("Summed gate weight ÷ assignments per expert; record per-token facts "
                      "(`probes.attach(..., tokens=0.01)`) for the full distribution per top-k slot.")
    else:
        right.info("This run recorded no gate weights (weight_sum is empty).")


body()
