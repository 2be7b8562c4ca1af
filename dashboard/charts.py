"""Altair chart builders: pure functions from small (already aggregated) DataFrames.

Every axis says what it counts and in which unit; thresholds are drawn where
an alert rule uses them (DESIGN §4), so a reader sees how far a line is from
firing.
"""
from __future__ import annotations

import altair as alt
import pandas as pd

from chrono.snapshots import CONFIRMED_TOP2, PRE_NEFF_FRACTION, PRE_TOP2
from dashboard.status import STATUS_COLORS

# Altair's debug mode validates every schema object as it is created (about half the time
# spent on a chart here); the finished spec is still validated once when Streamlit calls
# to_dict(), so mistakes are caught all the same.
alt.utils.schemapi.disable_debug_mode()

ALERT_COLORS = alt.Scale(domain=["PRE_COLLAPSE", "COLLAPSE_CONFIRMED"],
                         range=[STATUS_COLORS["PRE_COLLAPSE"], STATUS_COLORS["COLLAPSE_CONFIRMED"]])
# Series colours (layers, runs, signals): no red, orange or brown, which mean "alert" here.
SERIES_PALETTE = ["#4c78a8", "#54a24b", "#b279a2", "#17becf", "#6b6ecf", "#8c9c2b", "#1f3b73", "#7fc97f",
                  "#9467bd", "#2ca089", "#a6cee3", "#636363"]
SERIES = alt.Scale(range=SERIES_PALETTE)
# Expert-share heatmaps: white at the uniform share 1/n, blue below (starved), purple above (hot);
# fixed ends 0 and 1, so a healthy run stays pale whatever its own min/max.
SHARE_STARVED, SHARE_UNIFORM, SHARE_HOT = "#2166ac", "#f7f7f7", "#40004b"
STEP = alt.X("step:Q", title="training step", axis=alt.Axis(format="~s"))
# Legends under the plot: a right-hand legend taller than the plot gets clipped.
BOTTOM_LEGEND = dict(orient="bottom", direction="horizontal", columns=4, titleOrient="left",
                     labelLimit=220, symbolLimit=0)


def layer_label(layer: int) -> str:
    return "global (mean)" if int(layer) == -1 else f"layer {int(layer)}"


def share_scale(n_experts: int) -> alt.Scale:
    """Diverging colour scale for shares of ``n_experts``: 0 -> blue, 1/n -> white, 1 -> dark purple."""
    if int(n_experts) < 2:  # one expert always holds 100 %: that is its uniform share (white)
        return alt.Scale(domain=[0.0, 1.0], range=[SHARE_STARVED, SHARE_UNIFORM], interpolate="lab", clamp=True)
    u = 1.0 / int(n_experts)
    return alt.Scale(domain=[0.0, u, 1.0], range=[SHARE_STARVED, SHARE_UNIFORM, SHARE_HOT],
                     interpolate="lab", clamp=True)


def share_legend(n_experts: int) -> alt.Legend:
    u = 1.0 / max(1, int(n_experts))
    return alt.Legend(format=".1~%", values=sorted({0.0, round(u, 4), 0.5, 1.0}), gradientLength=320,
                      orient="bottom", direction="horizontal", titleOrient="top", titleLimit=600,
                      title=[f"share of tokens: white = uniform share 1/{int(n_experts)} = {u:.1%},",
                             "blue = starved, purple = hot"])   # two lines: fits a half-width chart


def _expert_axis(n_exp: int) -> alt.Axis:
    """Every expert labelled (up to 128 experts; beyond, Vega thins labels that would overlap)."""
    return alt.Axis(labelOverlap=n_exp > 128, values=list(range(n_exp)) if n_exp <= 128 else None,
                    labelFontSize=11 if n_exp <= 48 else 8, labelAngle=0)


def share_heatmap(df: pd.DataFrame, layer: int, height: int = 320, n_experts: int | None = None) -> alt.Chart:
    """Step x expert heatmap of one layer's token shares (bins of several steps when wide).

    Colour is anchored to the uniform share 1/n (``share_scale``), not to the chart's own range.
    """
    n_exp = n_experts or (int(df["expert"].max()) + 1 if len(df) else 1)
    return alt.Chart(df, title=f"Expert share over steps, {layer_label(layer)}").mark_rect().encode(
        x=alt.X("step_start:Q", title="training step", axis=alt.Axis(format="~s")),
        x2="step_end:Q",
        y=alt.Y("expert:O", title="expert", sort="ascending", scale=alt.Scale(domain=list(range(n_exp))),
                axis=_expert_axis(n_exp)),
        color=alt.Color("share:Q", scale=share_scale(n_exp), legend=share_legend(n_exp)),
        tooltip=[alt.Tooltip("step_start:Q", title="from step"),
                 alt.Tooltip("step_end:Q", title="to step (excl.)"),
                 alt.Tooltip("expert:O"), alt.Tooltip("tokens:Q", title="tokens", format=","),
                 alt.Tooltip("share:Q", format=".2%")],
    ).properties(height=height)


def layer_expert_heatmap(df: pd.DataFrame, height: int = 260) -> alt.Chart:
    """Layer x expert totals over the whole run (share of each layer's tokens), anchored at 1/n.

    Layers with different expert counts cannot share one white point: then the colour is the
    share relative to the layer's uniform share (1 = uniform), still with fixed ends.
    """
    n_by_layer = df.groupby("layer")["expert"].max() + 1
    n_exp = int(n_by_layer.max()) if len(df) else 1
    x = alt.X("expert:O", title="expert", scale=alt.Scale(domain=list(range(n_exp))), axis=_expert_axis(n_exp))
    if n_by_layer.nunique() <= 1:
        color = alt.Color("share:Q", scale=share_scale(n_exp), legend=share_legend(n_exp))
    else:
        df = df.assign(vs_uniform=df["share"] * df["layer"].map(n_by_layer))
        color = alt.Color("vs_uniform:Q", scale=alt.Scale(domain=[0, 1, n_exp], clamp=True, interpolate="lab",
                                                          range=[SHARE_STARVED, SHARE_UNIFORM, SHARE_HOT]),
                          legend=alt.Legend(title="share ÷ uniform share 1/n (white = 1, uniform)", orient="bottom",
                                            direction="horizontal", titleOrient="top", gradientLength=320,
                                            titleLimit=600))
    return alt.Chart(df, title="Share of each layer's tokens, whole run").mark_rect().encode(
        x=x, y=alt.Y("layer:O", title="layer"), color=color,
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
        color=alt.Color("k:N", title="top-k slot", scale=SERIES),
        tooltip=["k:N", alt.Tooltip("weight_bin:Q", format=".2f"), alt.Tooltip("assignments:Q", format=",")],
    ).properties(height=height)


def expert_weight_bars(df: pd.DataFrame, layer: int, height: int = 240) -> alt.Chart:
    """Mean gate weight per dispatched assignment, per expert (from routing.weight_sum)."""
    return alt.Chart(df, title=f"Mean top-k gate weight per assignment, {layer_label(layer)}").mark_bar().encode(
        x=alt.X("expert:O", title="expert", axis=alt.Axis(labelOverlap=True)),
        y=alt.Y("mean_weight:Q", title="mean gate weight"),
        tooltip=["expert:O", alt.Tooltip("mean_weight:Q", format=".3f"),
                 alt.Tooltip("tokens:Q", title="assignments", format=",")],
    ).properties(height=height)


def _alert_rules(alerts: pd.DataFrame | None) -> alt.LayerChart | None:
    """Dotted vertical rules where alerts were raised, each labelled with its layer ('L3')."""
    if alerts is None or alerts.empty:
        return None
    raised = alerts[alerts["transition"] == "raised"]
    if raised.empty:
        return None
    raised = raised.assign(tag=[f"L{int(l)}" for l in raised["layer"]])
    # one label per (step, alert): 'L1 L2 L3' when several layers fired in the same snapshot
    tags = (raised.groupby(["step", "alert"], as_index=False)
            .agg(tag=("tag", lambda t: " ".join(sorted(set(t), key=lambda x: int(x[1:]))))))
    rules = alt.Chart(raised).mark_rule(strokeDash=[2, 2], opacity=0.7, strokeWidth=1.5).encode(
        x="step:Q",
        color=alt.Color("alert:N", scale=ALERT_COLORS, legend=None),  # explained in the page caption
        tooltip=[alt.Tooltip("step:Q", title="raised at step"), "layer:O", "alert:N",
                 alt.Tooltip("neff:Q", format=".2f"), alt.Tooltip("top2_share:Q", format=".3f"), "dead:Q"],
    )
    text = alt.Chart(tags).mark_text(angle=270, align="right", baseline="middle", dx=-4, dy=-6, fontSize=10,
                                     fontWeight="bold").encode(
        x="step:Q", y=alt.value(0), text="tag:N",
        color=alt.Color("alert:N", scale=ALERT_COLORS, legend=None))
    return rules + text


def _thresholds(values: list[tuple[float, str]]) -> alt.Chart | None:
    if not values:
        return None
    df = pd.DataFrame([{"y": v, "rule": label, "above": i % 2 == 1}
                       for i, (v, label) in enumerate(sorted(values))])
    base = alt.Chart(df)
    rule = base.mark_rule(color="#555", strokeDash=[6, 3]).encode(
        y="y:Q", tooltip=[alt.Tooltip("rule:N", title="threshold"), alt.Tooltip("y:Q", format=".3g")])
    text_style = dict(align="left", dx=4, color="#333", fontSize=11)
    halo = dict(stroke="white", strokeWidth=4, strokeOpacity=0.9, strokeJoin="round")   # readable over lines
    labels = []
    for style in (halo, {}):
        below = base.transform_filter("!datum.above").mark_text(baseline="top", dy=3, **text_style, **style)
        above = base.transform_filter("datum.above").mark_text(baseline="bottom", dy=-3, **text_style, **style)
        labels += [m.encode(y="y:Q", text="rule:N", x=alt.value(0)) for m in (below, above)]
    return alt.layer(rule, *labels)


def health_chart(df: pd.DataFrame, field: str, title: str, y_title: str,
                 thresholds: list[tuple[float, str]] = (), alerts: pd.DataFrame | None = None,
                 y_domain=None, height: int = 340, dash: str | None = None) -> alt.LayerChart | alt.Chart:
    """One health metric per layer over steps, with rule thresholds and alert markers.

    ``dash``: a second nominal column drawn as the line's dash pattern (e.g. dead / nearly dead).
    """
    y = alt.Y(f"{field}:Q", title=y_title)
    if y_domain is not None:
        y = alt.Y(f"{field}:Q", title=y_title, scale=alt.Scale(domain=y_domain))
    enc = dict(
        x=STEP, y=y,
        color=alt.Color("layer_name:N", title="layer", sort=alt.SortField("layer"), scale=SERIES),
        tooltip=[alt.Tooltip("step:Q"), alt.Tooltip("layer_name:N", title="layer"),
                 alt.Tooltip(f"{field}:Q", format=".3f"), alt.Tooltip("n_experts:Q", title="experts")],
    )
    if dash:
        kinds = sorted(df[dash].unique())
        enc["strokeDash"] = alt.StrokeDash(f"{dash}:N", legend=None,
                                           scale=alt.Scale(domain=kinds, range=[[1, 0], [5, 3], [1, 3]][:len(kinds)]))
        enc["detail"] = f"{dash}:N"
        enc["tooltip"] = enc["tooltip"] + [alt.Tooltip(f"{dash}:N")]
    lines = alt.Chart(df).mark_line(point=len(df) <= 60).encode(**enc)
    layers = [lines]
    for extra in (_thresholds(list(thresholds)), _alert_rules(alerts)):
        if extra is not None:
            layers.append(extra)
    chart = alt.layer(*layers).resolve_scale(color="independent") if len(layers) > 1 else lines
    return chart.properties(title=title, height=height).configure_legend(**BOTTOM_LEGEND)


def neff_thresholds(n_experts: list[int]) -> list[tuple[float, str]]:
    return [(PRE_NEFF_FRACTION * n, f"PRE_COLLAPSE below {PRE_NEFF_FRACTION:g}·{n} = {PRE_NEFF_FRACTION * n:g}")
            for n in sorted(set(int(x) for x in n_experts))]


TOP2_THRESHOLDS = [(PRE_TOP2, f"PRE_COLLAPSE above {PRE_TOP2:g}"),
                   (CONFIRMED_TOP2, f"COLLAPSE_CONFIRMED above {CONFIRMED_TOP2:g} (with dead ≥ 1)")]


def alert_timeline(df: pd.DataFrame, spans: pd.DataFrame, height: int = 220) -> alt.LayerChart:
    """Active periods (bars) and transitions (points) per layer over steps."""
    bars = alt.Chart(spans).mark_bar(opacity=0.35).encode(
        x=alt.X("start:Q", title="training step"), x2="end:Q",
        y=alt.Y("layer_name:N", title=None, sort=alt.SortField("layer"), scale=alt.Scale(paddingInner=0.3)),
        yOffset=alt.YOffset("alert:N", scale=alt.Scale(domain=ALERT_COLORS.domain)),
        color=alt.Color("alert:N", title="alert", scale=ALERT_COLORS),
        tooltip=["layer_name:N", "alert:N", alt.Tooltip("start:Q", title="raised at"),
                 alt.Tooltip("end:Q", title="cleared at / last step"), "open:N"],
    )
    points = alt.Chart(df).mark_point(size=70, filled=True).encode(
        x="step:Q", y=alt.Y("layer_name:N", sort=alt.SortField("layer")),
        yOffset=alt.YOffset("alert:N", scale=alt.Scale(domain=ALERT_COLORS.domain)),
        color=alt.Color("alert:N", scale=ALERT_COLORS),
        shape=alt.Shape("transition:N", title="transition",
                        scale=alt.Scale(domain=["raised", "cleared"], range=["triangle-up", "circle"])),
        tooltip=["step:Q", "layer_name:N", "alert:N", "transition:N", "consecutive:Q",
                 alt.Tooltip("neff:Q", format=".2f"), "n_experts:Q",
                 alt.Tooltip("top2_share:Q", format=".3f"), "dead:Q"],
    )
    return (bars + points).properties(title="Alert timeline (bars: active, ▲ raised, ● cleared)",
                                      height=height).configure_legend(**BOTTOM_LEGEND)


def multi_line(df: pd.DataFrame, y: str, color: str, title: str, y_title: str, color_title: str,
               y_format: str | None = None, height: int = 300, y_domain=None) -> alt.Chart:
    axis = alt.Axis(format=y_format or "~g")
    scale = alt.Scale(domain=y_domain) if y_domain is not None else alt.Scale(zero=False)
    single = df[color].nunique() <= 1  # one series: its name is in the title, no legend needed
    return alt.Chart(df, title=title).mark_line(point=len(df) <= 60).encode(
        x=STEP,
        y=alt.Y(f"{y}:Q", title=y_title, axis=axis, scale=scale),
        color=alt.Color(f"{color}:N", title=color_title, legend=None if single else alt.Legend(), scale=SERIES),
        tooltip=["step:Q", f"{color}:N", alt.Tooltip(f"{y}:Q", format=".4g")],
    ).properties(height=height).configure_legend(**BOTTOM_LEGEND)


def lifecycle_events(df: pd.DataFrame, height: int = 260) -> alt.Chart:
    return alt.Chart(df, title="Lifecycle events (filled: applied, hollow: proposed only)").mark_point(
        size=110, strokeWidth=2).encode(
        x=alt.X("step:Q", title="training step", scale=alt.Scale(padding=16)),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("event:N", title="event", scale=SERIES),
        shape=alt.Shape("event:N"),
        fill=alt.condition("datum.applied", alt.Color("event:N", title="event", scale=SERIES),
                           alt.value("transparent")),
        tooltip=["step:Q", "layer:O", "event:N", "expert:Q", "source_expert:Q", "n_experts_after:Q",
                 "applied:N", "reason:N"],
    ).properties(height=height).configure_legend(**BOTTOM_LEGEND)


def experts_over_time(df: pd.DataFrame, height: int = 260) -> alt.Chart:
    return alt.Chart(df, title="Experts per layer after each event").mark_line(interpolate="step-after",
                                                                                 point=True).encode(
        x=alt.X("step:Q", title="training step", scale=alt.Scale(padding=16), axis=alt.Axis(format="~s")),
        y=alt.Y("n_experts_after:Q", title="experts", scale=alt.Scale(zero=False, padding=12),
                axis=alt.Axis(format="d", tickMinStep=1)),
        color=alt.Color("layer:N", title="layer", scale=SERIES),
        tooltip=["step:Q", "layer:N", "n_experts_after:Q", "event:N"],
    ).properties(height=height).configure_legend(**BOTTOM_LEGEND)


STRIP_STATUSES = list(STATUS_COLORS)  # legend order: OK, PRE_COLLAPSE, COLLAPSE_CONFIRMED


def health_strip(df: pd.DataFrame, height: int | None = None) -> alt.Chart:
    """Layer x step strip: each cell is the worst alert state of that layer in that step bin.

    ``df``: ``dashboard.status.state_strip`` rows (layer, x_start, x_end, status, neff, ...).
    Grey = OK; orange / red only when the layer's alert was active.
    """
    n_layers = max(1, df["layer"].nunique())
    colors = alt.Scale(domain=STRIP_STATUSES, range=list(STATUS_COLORS.values()))
    return alt.Chart(df, title="Alert state per layer over steps (grey OK, orange PRE_COLLAPSE, "
                               "red COLLAPSE_CONFIRMED)").mark_rect(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("x_start:Q", title="training step", axis=alt.Axis(format="~s")), x2="x_end:Q",
        y=alt.Y("layer:O", title="layer", sort="ascending", axis=alt.Axis(labelOverlap=n_layers > 64)),
        color=alt.Color("status:N", title="state", scale=colors, legend=None),  # the title names the colours
        tooltip=["layer:O", alt.Tooltip("step_start:Q", title="snapshots from step"),
                 alt.Tooltip("step_end:Q", title="to step"), "status:N",
                 alt.Tooltip("neff:Q", title="Neff (mean)", format=".2f"), "n_experts:Q",
                 alt.Tooltip("top2_share:Q", title="Top-2 (mean)", format=".3f"),
                 alt.Tooltip("dead:Q", title="dead (max)")],
    ).properties(height=height or 90 + min(640, 30 * n_layers))


def dead_small_multiples(df: pd.DataFrame, columns: int = 4, panel_height: int = 120,
                         panel_width: int = 170) -> alt.FacetChart:
    """One small panel per layer: dead (solid) and nearly dead (dashed) experts over steps.

    ``df``: long rows (step, layer, layer_name, kind, experts, n_experts).
    """
    kinds = ["dead (share = 0)", "nearly dead (< 1 %)"]
    base = alt.Chart(df).mark_line(point=len(df) <= 60, interpolate="step-after").encode(
        x=alt.X("step:Q", title="training step", axis=alt.Axis(format="~s", tickCount=4)),
        y=alt.Y("experts:Q", title="experts", axis=alt.Axis(format="d", tickMinStep=1)),
        color=alt.Color("kind:N", title=None, scale=alt.Scale(domain=kinds, range=["#222222", "#4c78a8"])),
        strokeDash=alt.StrokeDash("kind:N", legend=None, scale=alt.Scale(domain=kinds, range=[[1, 0], [5, 3]])),
        tooltip=["step:Q", alt.Tooltip("layer_name:N", title="layer"), "kind:N", "experts:Q",
                 alt.Tooltip("n_experts:Q", title="experts in layer")],
    ).properties(height=panel_height, width=panel_width)
    return base.facet(
        facet=alt.Facet("layer_name:N", title=None, sort=alt.SortField("layer"),
                        header=alt.Header(labelFontWeight="bold", labelFontSize=12)),
        columns=columns,
        title="Dead (solid) and nearly dead (dashed, < 1 %) experts per layer",
    ).configure_legend(**BOTTOM_LEGEND)


def abstain_band(df: pd.DataFrame, height: int | None = None) -> alt.Chart:
    """Layer x step band: dark where the controller abstained, light where it acted.

    ``df``: binned decisions (layer_name, layer, step_start, step, abstain_fraction, decisions).
    """
    n = max(1, df["layer"].nunique())
    return alt.Chart(df, title="When the controller abstained (dark) or acted (light)").mark_rect().encode(
        x=alt.X("step_start:Q", title="training step", axis=alt.Axis(format="~s"),
                scale=alt.Scale(zero=False)), x2="step_end:Q",   # from the first decision, as the lines
        y=alt.Y("layer_name:N", title=None, sort=alt.SortField("layer")),
        color=alt.Color("abstain_fraction:Q", title="share of decisions abstaining",
                        scale=alt.Scale(domain=[0, 1], range=["#e8eef6", "#1f3b73"]),
                        legend=alt.Legend(format=".0%", gradientLength=180)),
        tooltip=[alt.Tooltip("layer_name:N", title="layer"), alt.Tooltip("step_start:Q", title="from step"),
                 alt.Tooltip("step:Q", title="to step"),
                 alt.Tooltip("abstain_fraction:Q", title="abstaining", format=".0%"), "decisions:Q"],
    ).properties(height=height or 170 + min(400, 30 * n)).configure_legend(**BOTTOM_LEGEND)
