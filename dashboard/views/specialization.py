"""Specialization: which experts team up, which tokens each expert takes, how routing drifted,
and what an expert placement plan would do to GPU imbalance (chrono.analysis)."""
from __future__ import annotations

import altair as alt
import streamlit as st

from dashboard import analysis_data as ad
from dashboard import charts, ui

st.title("Specialization")
run = ui.need_run()


def coactivation_heatmap(cells, layer: int) -> alt.Chart:
    return alt.Chart(cells, title=f"Co-activation lift, {charts.layer_label(layer)}").mark_rect().encode(
        x=alt.X("expert_a:O", title="expert"), y=alt.Y("expert_b:O", title="expert"),
        color=alt.Color("lift:Q", title="lift (1 = independent)",
                        # (a diverging scheme without red: red means COLLAPSE_CONFIRMED here)
                        scale=alt.Scale(type="symlog", scheme="purplegreen", domainMid=1, reverse=True)),
        tooltip=[alt.Tooltip("expert_a:O", title="expert"), alt.Tooltip("expert_b:O", title="with"),
                 alt.Tooltip("tokens_both:Q", title="tokens choosing both", format=","),
                 alt.Tooltip("lift:Q", format=".2f")],
    ).properties(height=360)


def drift_lines(df) -> alt.Chart:
    return alt.Chart(df, title="Routing drift: each window vs the last (JS divergence)").mark_line(
        point=True).encode(
        x=alt.X("start:Q", title="window start (training step)", axis=alt.Axis(format="~s")),
        y=alt.Y("js:Q", title="Jensen-Shannon divergence (bits)"),
        color=alt.Color("layer:N", title="layer", legend=alt.Legend(**charts.BOTTOM_LEGEND)),
        tooltip=["layer:N", alt.Tooltip("start:Q", title="from step"), alt.Tooltip("stop:Q", title="to step"),
                 alt.Tooltip("js:Q", format=".4f"), alt.Tooltip("top1_changed:Q", format=".1%")],
    ).properties(height=280)


def placement_bars(df) -> alt.Chart:
    long = df.melt(id_vars=["layer"], value_vars=["before_ratio", "after_ratio"],
                   var_name="placement", value_name="ratio")
    long["placement"] = long["placement"].map({"before_ratio": "trivial", "after_ratio": "planned"})
    return alt.Chart(long, title="Busiest GPU ÷ mean GPU load per layer").mark_bar().encode(
        x=alt.X("layer:O", title="layer"), xOffset="placement:N",
        y=alt.Y("ratio:Q", title="max / mean GPU load (1 = balanced)"),
        color=alt.Color("placement:N", title="placement", legend=alt.Legend(**charts.BOTTOM_LEGEND)),
        tooltip=["layer:O", "placement:N", alt.Tooltip("ratio:Q", format=".3f")],
    ).properties(height=280)


@ui.live
def body():
    co, co_summary, _ = ad.analysis(run, "coactivation")
    st.subheader("Experts chosen together")
    if co is None:
        st.info(co_summary)
    else:
        layers = sorted(int(l) for l in co["layer"].unique())
        layer = st.selectbox("Layer", layers, format_func=charts.layer_label, key="spec_layer")
        cells = ad.coactivation_cells(co, layer)
        st.altair_chart(coactivation_heatmap(cells, layer), width="stretch")
        top = co_summary.get(str(layer))
        if top:
            st.caption(f"Strongest pair: experts {top['top_pair'][0]} and {top['top_pair'][1]} "
                       f"(lift {top['lift']:.2f}) over {top['tokens']:,} tokens. Lift = P(both) ÷ "
                       "(P(a)·P(b)): above 1 they are picked together more than chance.")

        st.subheader("Tokens each expert receives")
        voc, voc_summary, _ = ad.analysis(run, "vocabulary", top=5, layer=layer)
        if voc is None:
            st.info(voc_summary)
        else:
            labels = ad.token_labels(run, voc["token_id"])
            voc = voc.assign(token=[labels.get(int(t), str(int(t))) for t in voc["token_id"]])
            per_expert = (voc.groupby("expert")
                             .agg(top_tokens=("token", lambda s: "  ".join(s)),
                                  tokens=("expert_assignments", "first"),
                                  distinct=("expert_distinct_tokens", "first"),
                                  entropy=("expert_entropy", "first"), kl=("expert_kl", "first"))
                             .reset_index())
            st.dataframe(per_expert, hide_index=True, width="stretch", column_config={
                "top_tokens": st.column_config.TextColumn("top tokens (most first)"),
                "tokens": st.column_config.NumberColumn("assignments", format="%d"),
                "entropy": st.column_config.NumberColumn("vocab entropy (nats)", format="%.2f"),
                "kl": st.column_config.NumberColumn("KL to corpus (nats)", format="%.3f",
                                                    help="0 = sees the corpus mix; larger = specialised"),
            })
            if not labels:
                st.caption("Token ids shown as numbers: the run records no tokenizer "
                           "(config `tokenizer` = a tokenizer.json path, or `byte_level: true`).")

    st.subheader("Drift over the run")
    dr, dr_summary, notes = ad.analysis(run, "drift", n_windows=ad.DRIFT_WINDOWS)
    if dr is None:
        st.info(dr_summary)
    else:
        st.altair_chart(drift_lines(dr), width="stretch")
        st.caption("0 = the layer already routes as it does at the end (router saturation); "
                   "1 = disjoint experts." + (" " + " ".join(notes) if notes else ""))

    st.subheader("Expert placement plan")
    c = st.columns(2)
    gpus = c[0].number_input("GPUs", min_value=1, max_value=1024, value=4, key="spec_gpus")
    replicas = c[1].number_input("Redundant experts per layer", min_value=0, max_value=1024, value=0,
                                 key="spec_replicas")
    plan, psummary = ad.placement(run, gpus, replicas)
    if plan is None:
        st.info(psummary)
    else:
        m = st.columns(2)
        m[0].metric("Max/mean GPU load, trivial", ui.fmt_float(psummary["mean_before_ratio"]))
        m[1].metric("Max/mean GPU load, planned", ui.fmt_float(psummary["mean_after_ratio"]))
        st.altair_chart(placement_bars(plan), width="stretch")
        st.caption(f"{psummary['policy']} placement from the run's total loads; write the plan with "
                   f"`chrono plan-placement {run} --gpus {gpus} --replicas {replicas} -o DIR`.")


body()
