"""Altair chart builders: pure functions from small (already aggregated) DataFrames.

Every axis says what it counts and in which unit; thresholds are drawn where
an alert rule uses them (DESIGN §4), so a reader sees how far a line is from
firing.
"""
from __future__ import annotations

import altair as alt
import pandas as pd

from chrono.snapshots import CONFIRMED_TOP2, PRE_NEFF_FRACTION, PRE_TOP2

ALERT_COLORS = alt.Scale(domain=["PRE_COLLAPSE", "COLLAPSE_CONFIRMED"], range=["#f28e2b", "#d62728"])
STEP = alt.X("step:Q", title="training step", axis=alt.Axis(format="~s"))


def layer_label(layer: int) -> str:
    return "global (mean)" if int(layer) == -1 else f"layer {int(layer)}"


def share_heatmap(df: pd.DataFrame, layer: int, height: int = 320) -> alt.Chart:
    """Step x expert heatmap of one layer's token shares (bins of several steps when wide)."""
    n_exp = int(df["expert"].max()) + 1 if len(df) else 1
    return alt.Chart(df, title=f"Expert share over steps, {layer_label(layer)}").mark_rect().encode(
        x=alt.X("step_start:Q", title="training step", axis=alt.Axis(format="~s")),
        x2="step_end:Q",
        y=alt.Y("expert:O", title="expert", sort="ascending",
                axis=alt.Axis(labelOverlap=True) if n_exp > 32 else alt.Axis()),
        color=alt.Color("share:Q", title="share of tokens", scale=alt.Scale(scheme="viridis"),
                        legend=alt.Legend(format=".0%")),
        tooltip=[alt.Tooltip("step_start:Q", title="from step"),
                 alt.Tooltip("step_end:Q", title="to step (excl.)"),
                 alt.Tooltip("expert:O"), alt.Tooltip("tokens:Q", title="tokens", format=","),
                 alt.Tooltip("share:Q", format=".2%")],
    ).properties(height=height)


def layer_expert_heatmap(df: pd.DataFrame, height: int = 260) -> alt.Chart:
    """Layer x expert totals over the whole run (share of each layer's tokens)."""
    return alt.Chart(df, title="Share of each layer's tokens, whole run").mark_rect().encode(
        x=alt.X("expert:O", title="expert", axis=alt.Axis(labelOverlap=True)),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("share:Q", title="share of tokens", scale=alt.Scale(scheme="viridis"),
                        legend=alt.Legend(format=".0%")),
        tooltip=["layer:O", "expert:O", alt.Tooltip("tokens:Q", format=","),
                 alt.Tooltip("share:Q", format=".2%"),
                 alt.Tooltip("mean_weight:Q", title="mean gate weight", format=".3f")],
    ).properties(height=height)


def token_weight_hist(df: pd.DataFrame, layer: int, height: int = 240) -> alt.Chart:
    """Distribution of per-token gate weights, one colour per top-k slot."""
    return alt.Chart(df, title=f"Top-k gate weight distribution, {layer_label(layer)}").mark_bar(
        opacity=0.8).encode(
        x=alt.X("weight_bin:Q", title="gate weight (bin start)", bin=alt.BinParams(binned=True, step=0.05),
                scale=alt.Scale(domain=[0, 1])),
        x2="weight_end:Q",
        y=alt.Y("assignments:Q", title="token assignments", stack=None, axis=alt.Axis(format="~s")),
        color=alt.Color("k:N", title="top-k slot"),
        tooltip=["k:N", alt.Tooltip("weight_bin:Q", format=".2f"), alt.Tooltip("assignments:Q", format=",")],
    ).properties(height=height)


def expert_weight_bars(df: pd.DataFrame, layer: int, height: int = 240) -> alt.Chart:
    """Mean gate weight per dispatched assignment, per expert (from routing.weight_sum)."""
    return alt.Chart(df, title=f"Mean top-k gate weight per assignment, {layer_label(layer)}").mark_bar().encode(
        x=alt.X("expert:O", title="expert", axis=alt.Axis(labelOverlap=True)),
        y=alt.Y("mean_weight:Q", title="mean gate weight (0-1)"),
        tooltip=["expert:O", alt.Tooltip("mean_weight:Q", format=".3f"),
                 alt.Tooltip("tokens:Q", title="assignments", format=",")],
    ).properties(height=height)


def _alert_rules(alerts: pd.DataFrame | None) -> alt.Chart | None:
    if alerts is None or alerts.empty:
        return None
    raised = alerts[alerts["transition"] == "raised"]
    if raised.empty:
        return None
    return alt.Chart(raised).mark_rule(strokeDash=[2, 2], opacity=0.7, strokeWidth=1.5).encode(
        x="step:Q",
        color=alt.Color("alert:N", title="alert raised", scale=ALERT_COLORS),
        tooltip=[alt.Tooltip("step:Q", title="raised at step"), "layer:O", "alert:N",
                 alt.Tooltip("neff:Q", format=".2f"), alt.Tooltip("top2_share:Q", format=".3f"), "dead:Q"],
    )


def _thresholds(values: list[tuple[float, str]]) -> alt.Chart | None:
    if not values:
        return None
    df = pd.DataFrame([{"y": v, "rule": label} for v, label in values])
    base = alt.Chart(df)
    rule = base.mark_rule(color="#666", strokeDash=[6, 3]).encode(
        y="y:Q", tooltip=[alt.Tooltip("rule:N", title="threshold"), alt.Tooltip("y:Q", format=".3g")])
    text = base.mark_text(align="left", dx=4, dy=-6, color="#444", fontSize=11).encode(
        y="y:Q", text="rule:N", x=alt.value(0))
    return rule + text


def health_chart(df: pd.DataFrame, field: str, title: str, y_title: str,
                 thresholds: list[tuple[float, str]] = (), alerts: pd.DataFrame | None = None,
                 y_domain=None, height: int = 260) -> alt.LayerChart | alt.Chart:
    """One health metric per layer over steps, with rule thresholds and alert markers."""
    y = alt.Y(f"{field}:Q", title=y_title)
    if y_domain is not None:
        y = alt.Y(f"{field}:Q", title=y_title, scale=alt.Scale(domain=y_domain))
    lines = alt.Chart(df).mark_line(point=len(df) <= 60).encode(
        x=STEP, y=y,
        color=alt.Color("layer_name:N", title="layer", sort=alt.SortField("layer")),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("layer_name:N", title="layer"),
                 alt.Tooltip(f"{field}:Q", format=".3f"), alt.Tooltip("n_experts:Q", title="experts")],
    )
    layers = [lines]
    for extra in (_thresholds(list(thresholds)), _alert_rules(alerts)):
        if extra is not None:
            layers.append(extra)
    chart = alt.layer(*layers).resolve_scale(color="independent") if len(layers) > 1 else lines
    return chart.properties(title=title, height=height)


def neff_thresholds(n_experts: list[int]) -> list[tuple[float, str]]:
    return [(PRE_NEFF_FRACTION * n, f"PRE_COLLAPSE below {PRE_NEFF_FRACTION:g}·{n} = {PRE_NEFF_FRACTION * n:g}")
            for n in sorted(set(int(x) for x in n_experts))]


TOP2_THRESHOLDS = [(PRE_TOP2, f"PRE_COLLAPSE above {PRE_TOP2:g}"),
                   (CONFIRMED_TOP2, f"COLLAPSE_CONFIRMED above {CONFIRMED_TOP2:g} (with dead ≥ 1)")]


def alert_timeline(df: pd.DataFrame, spans: pd.DataFrame, height: int = 220) -> alt.LayerChart:
    """Active periods (bars) and transitions (points) per layer over steps."""
    bars = alt.Chart(spans).mark_bar(opacity=0.35, height={"band": 0.7}).encode(
        x=alt.X("start:Q", title="training step"), x2="end:Q",
        y=alt.Y("layer_name:N", title=None, sort=alt.SortField("layer")),
        color=alt.Color("alert:N", title="alert", scale=ALERT_COLORS),
        tooltip=["layer_name:N", "alert:N", alt.Tooltip("start:Q", title="raised at"),
                 alt.Tooltip("end:Q", title="cleared at / last step"), "open:N"],
    )
    points = alt.Chart(df).mark_point(size=70, filled=True).encode(
        x="step:Q", y=alt.Y("layer_name:N", sort=alt.SortField("layer")),
        color=alt.Color("alert:N", scale=ALERT_COLORS),
        shape=alt.Shape("transition:N", title="transition",
                        scale=alt.Scale(domain=["raised", "cleared"], range=["triangle-up", "circle"])),
        tooltip=["step:Q", "layer_name:N", "alert:N", "transition:N", "consecutive:Q",
                 alt.Tooltip("neff:Q", format=".2f"), "n_experts:Q",
                 alt.Tooltip("top2_share:Q", format=".3f"), "dead:Q"],
    )
    return (bars + points).properties(title="Alert timeline (bars: active, ▲ raised, ● cleared)", height=height)


def multi_line(df: pd.DataFrame, y: str, color: str, title: str, y_title: str, color_title: str,
               y_format: str | None = None, height: int = 240, y_domain=None) -> alt.Chart:
    axis = alt.Axis(format=y_format) if y_format else alt.Axis()
    scale = alt.Scale(domain=y_domain) if y_domain is not None else alt.Scale(zero=False)
    return alt.Chart(df, title=title).mark_line(point=len(df) <= 60).encode(
        x=STEP,
        y=alt.Y(f"{y}:Q", title=y_title, axis=axis, scale=scale),
        color=alt.Color(f"{color}:N", title=color_title),
        tooltip=["step:Q", f"{color}:N", alt.Tooltip(f"{y}:Q", format=".4g")],
    ).properties(height=height)


def lifecycle_events(df: pd.DataFrame, height: int = 220) -> alt.Chart:
    return alt.Chart(df, title="Lifecycle events (filled: applied, hollow: proposed only)").mark_point(
        size=90).encode(
        x=alt.X("step:Q", title="training step"),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("event:N", title="event"),
        shape=alt.Shape("event:N"),
        fill=alt.condition("datum.applied", alt.Color("event:N", legend=None), alt.value("transparent")),
        tooltip=["step:Q", "layer:O", "event:N", "expert:Q", "source_expert:Q", "n_experts_after:Q",
                 "applied:N", "reason:N"],
    ).properties(height=height)


def experts_over_time(df: pd.DataFrame, height: int = 220) -> alt.Chart:
    return alt.Chart(df, title="Experts per layer after each event").mark_line(interpolate="step-after",
                                                                                 point=True).encode(
        x=alt.X("step:Q", title="training step"),
        y=alt.Y("n_experts_after:Q", title="experts", scale=alt.Scale(zero=False)),
        color=alt.Color("layer:N", title="layer"),
        tooltip=["step:Q", "layer:N", "n_experts_after:Q", "event:N"],
    ).properties(height=height)
