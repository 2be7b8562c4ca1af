"""Health at a glance (issue 20): what an on-call engineer must be able to read off each page.

Ground truth comes from the store with plain SQL / pandas here, not from the dashboard's loaders.
"""
from __future__ import annotations

import colorsys
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import chrono
from tests.dashboard.conftest import chart_titles, metrics
from tests.dashboard.store_fixture import EMPTY_RUN, EXPERTS, HEALTHY_RUN, MAIN_RUN


def _specs(at) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def _datasets(at, i) -> dict[str, pd.DataFrame]:
    """The named datasets Streamlit sends next to chart ``i``'s spec (Arrow bytes)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    proto = at.get("vega_lite_chart")[i].proto
    return {d.name: convert_arrow_bytes_to_pandas_df(d.data.data) for d in proto.datasets}


def _title(spec) -> str:
    t = spec.get("title")
    return t.get("text") if isinstance(t, dict) else t


def _truth_active(root) -> pd.DataFrame:
    """Active alerts per run and layer: the last transition of each (run, layer, alert) is 'raised'."""
    con = chrono.connect(root)
    df = con.sql("SELECT run_id, step, layer, alert, transition, neff, n_experts FROM alerts").df()
    con.close()
    df = df.sort_values("step", kind="stable")
    last = df.groupby(["run_id", "layer", "alert"]).tail(1)
    return last[last["transition"] == "raised"]


# ------------------------------------------------------------------ 1. Runs table health
def test_runs_table_health_column_names_the_worst_layer(app, dash_store, tmp_path):
    src, _ = dash_store
    root = tmp_path / "store"
    shutil.copytree(src, root)
    with chrono.open_run(root, "bare") as w:  # no model description at all
        w.log_routing(0, 0, np.full(4, 5))
    at = app(root, "runs")
    table = at.dataframe[0].value.set_index("run")
    active = _truth_active(root)
    sev = {"PRE_COLLAPSE": 1, "COLLAPSE_CONFIRMED": 2}
    main = active[active["run_id"] == MAIN_RUN].copy()
    assert len(main), "the fixture's collapse run must end with active alerts"
    main["sev"] = main["alert"].map(sev)
    worst = main[main["sev"] == main["sev"].max()].copy()
    con = chrono.connect(root)  # the worst layer: lowest Neff / n in its latest snapshot
    latest = con.sql(f"SELECT layer, neff / n_experts AS frac FROM snapshots WHERE run_id = '{MAIN_RUN}' "
                     f"AND step = (SELECT max(step) FROM snapshots WHERE run_id = '{MAIN_RUN}')").df()
    con.close()
    worst["frac"] = worst["layer"].map(dict(zip(latest["layer"], latest["frac"])))
    worst = worst.sort_values(["frac", "layer"]).iloc[0]
    assert table.loc[MAIN_RUN, "health"] == worst["alert"] == "COLLAPSE_CONFIRMED"
    assert table.loc[MAIN_RUN, "worst layer"] == f"layer {int(worst['layer'])}"
    assert table.loc[MAIN_RUN, "alerting layers"] == main["layer"].nunique()
    for run in (HEALTHY_RUN, EMPTY_RUN, "bare"):
        assert table.loc[run, "health"] == "OK" and table.loc[run, "worst layer"] == "–"
    # no literal None / NaN cell anywhere, also for the run without a model description
    assert table.loc["bare", "model"] == "(not described)"
    # the write API learns an undeclared layer from its first routing call (chrono.declared)
    assert table.loc["bare", "layers × experts"] == "1 × 4"
    for col in table.columns:
        assert not table[col].isna().any(), col
        assert "None" not in table[col].astype(str).tolist(), col
    # worst first by default; the filter keeps only the chosen states
    assert list(at.dataframe[0].value["run"])[0] == MAIN_RUN
    assert metrics(at)["Collapse confirmed"] == "1"
    at.button_group(key="runs_health_filter").set_value(["OK"]).run()
    assert set(at.dataframe[0].value["run"]) == {HEALTHY_RUN, EMPTY_RUN, "bare"}
    assert "1 of 4 runs hidden" in at.caption[-1].value or any("1 of 4 runs hidden" in c.value for c in at.caption)


def test_health_cell_colours_are_the_alert_colours():
    from dashboard.status import STATUS_COLORS, health_cell_styles

    css = health_cell_styles(["OK", "PRE_COLLAPSE", "COLLAPSE_CONFIRMED", "other"])
    assert STATUS_COLORS["COLLAPSE_CONFIRMED"] in css[2] and STATUS_COLORS["PRE_COLLAPSE"] in css[1]
    assert STATUS_COLORS["OK"] in css[0] and css[3] == ""
    assert len(set(css[:3])) == 3


# ------------------------------------------------------------------ 2. heatmaps anchored at 1/n
@pytest.mark.parametrize("run,n", [(MAIN_RUN, EXPERTS), (HEALTHY_RUN, 4)])
def test_heatmaps_are_anchored_at_the_uniform_share(app, dash_store, run, n):
    root, _ = dash_store
    at = app(root, "routing", run=run)
    for spec in _specs(at)[:2]:  # step x expert, then layer x expert
        color = spec["encoding"]["color"]
        assert color["field"] == "share"
        assert color["scale"]["domain"] == pytest.approx([0.0, 1 / n, 1.0])  # fixed ends, white at 1/n
        assert color["scale"]["range"][1] == "#f7f7f7"
        title = color["legend"]["title"]   # a list of lines (newcomer2: fits a half-width chart)
        assert f"uniform share 1/{n}" in (" ".join(title) if isinstance(title, list) else title)
        axis_enc = spec["encoding"]["y" if "over steps" in _title(spec) else "x"]
        assert axis_enc["axis"]["values"] == list(range(n))  # every expert tick labelled
        assert axis_enc["axis"]["labelOverlap"] is False


def test_heatmap_colour_does_not_depend_on_the_data_range():
    """The same share gets the same colour in a healthy and in a collapsed chart."""
    from dashboard.charts import share_heatmap

    healthy = pd.DataFrame({"step_start": [0] * 8, "step_end": [1] * 8, "expert": range(8), "tokens": 1,
                            "share": np.linspace(0.05, 0.24, 8)})
    collapsed = healthy.assign(share=[0.85, 0.15] + [0.0] * 6)
    a, b = (share_heatmap(d, 0).to_dict()["encoding"]["color"]["scale"] for d in (healthy, collapsed))
    assert a == b


# ------------------------------------------------------------------ 3. neutral zero deltas
def test_zero_change_is_a_neutral_delta(app, dash_store):
    root, _ = dash_store
    at = app(root, "health", run=HEALTHY_RUN)  # two identical uniform snapshots
    by_label = {m.label: m.proto for m in at.metric}
    dead = by_label["Dead experts (all layers)"]
    assert dead.delta == "no change"
    from streamlit.proto.Metric_pb2 import Metric

    assert dead.color == Metric.MetricColor.GRAY and dead.direction == Metric.MetricDirection.NONE
    assert by_label["Neff (mean over layers)"].delta == "no change"


def test_delta_helper_signs_and_colours():
    from dashboard.ui import delta

    assert delta(0.0004, lambda d: f"{d:+.2f}") == {"delta": "no change", "delta_color": "off", "delta_arrow": "off"}
    assert delta(2, lambda d: f"{d:+.0f}", up_is_bad=True) == {"delta": "+2", "delta_color": "inverse"}
    assert delta(-0.5, lambda d: f"{d:+.2f}") == {"delta": "-0.50", "delta_color": "normal"}
    assert delta(None, str) == {} and delta(float("nan"), str) == {}


# ------------------------------------------------------------------ 4. colours, strip, small multiples
def _hue_deg(hex_color: str) -> tuple[float, float]:
    r, g, b = (int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5))
    h, _, s = colorsys.rgb_to_hls(r, g, b)
    return h * 360, s


def test_series_palette_has_no_alert_hues():
    from dashboard.charts import SERIES_PALETTE
    from dashboard.status import STATUS_COLORS

    for c in SERIES_PALETTE:
        hue, sat = _hue_deg(c)
        assert sat < 0.15 or 50 < hue < 330, f"{c} looks like an alert colour (hue {hue:.0f})"
        assert c not in STATUS_COLORS.values()


def test_health_page_strip_markers_and_small_multiples(app, dash_store):
    root, _ = dash_store
    at = app(root, "health", run=MAIN_RUN)
    specs = _specs(at)
    strip = specs[0]
    assert _title(strip).startswith("Alert state per layer over steps")
    cells = _datasets(at, 0)[strip["data"]["name"]]
    # ground truth: the state of each layer at the last snapshot equals its active alerts
    active = _truth_active(root)
    main = active[active["run_id"] == MAIN_RUN]
    last = cells.sort_values("step_end").groupby("layer").tail(1).set_index("layer")["status"]
    sev = {"PRE_COLLAPSE": 1, "COLLAPSE_CONFIRMED": 2}
    for layer, status in last.items():
        alerts = main[main["layer"] == layer]["alert"]
        want = max(alerts, key=sev.get) if len(alerts) else "OK"
        assert status == want, (layer, status, want)
    # layer lines never use alert colours; alert markers carry the layer's name
    neff = specs[1]
    layer_scale = neff["layer"][0]["encoding"]["color"]["scale"]
    assert "#d62728" not in layer_scale["range"] and "#f28e2b" not in layer_scale["range"]
    def flat(spec):
        for l in spec.get("layer", []):
            yield l
            yield from flat(l)

    texts = [l for l in flat(neff) if isinstance(l.get("mark"), dict) and l["mark"].get("type") == "text"
             and l["encoding"].get("text", {}).get("field") == "tag"]
    assert texts, "alert markers should be labelled with their layer"
    tags = {t for l in texts for t in _datasets(at, 1)[l["data"]["name"]]["tag"]}
    raised_layers = {f"L{int(l)}" for l in main["layer"]}
    assert raised_layers <= {x for t in tags for x in t.split()}
    dead = specs[4]
    assert "facet" in dead and dead["facet"]["field"] == "layer_name"  # small multiples, one per layer


def test_state_strip_rules():
    from dashboard.status import active_spans, state_strip

    alerts = pd.DataFrame([
        {"step": 29, "layer": 0, "alert": "PRE_COLLAPSE", "transition": "raised"},
        {"step": 59, "layer": 0, "alert": "PRE_COLLAPSE", "transition": "cleared"},
        {"step": 49, "layer": 1, "alert": "COLLAPSE_CONFIRMED", "transition": "raised"},
    ])
    spans = active_spans(alerts, last_step=79)
    windows = pd.DataFrame([{"layer": l, "step_start": s, "step_end": s} for l in (0, 1) for s in range(9, 80, 10)])
    got = state_strip(windows, spans).set_index(["layer", "step_start"])["status"]
    # layer 0: active from the raising snapshot (29) up to, not including, the clearing one (59)
    assert [got[(0, s)] for s in range(9, 80, 10)] == ["OK", "OK", "PRE_COLLAPSE", "PRE_COLLAPSE",
                                                        "PRE_COLLAPSE", "OK", "OK", "OK"]
    assert [got[(1, s)] for s in range(9, 80, 10)] == ["OK"] * 4 + ["COLLAPSE_CONFIRMED"] * 4


# ------------------------------------------------------------------ 5. governance
def test_governance_terms_have_help_and_reasons_are_grouped(app, dash_store):
    root, facts = dash_store
    at = app(root, "governance", run=MAIN_RUN)
    helped = {m.value.split("**")[1]: m.proto.help for m in at.markdown if m.proto.help and m.value.startswith("**")}
    for term in ("Topology debt", "Pressure", "Heat", "Lens scale", "Backoff", "Abstaining"):
        assert len(helped.get(term, "")) > 40, term
    reasons = at.dataframe[0].value
    con = chrono.connect(root)
    raw = con.sql(f"SELECT reason, abstain FROM decisions WHERE run_id = '{MAIN_RUN}'").df()
    con.close()
    assert raw["reason"].nunique() > 5  # the raw text differs per decision (values inside)
    kinds = {("act" if not a else "abstain"): n for a, n in raw.groupby("abstain").size().items()}
    got = dict(zip(reasons["kind"], reasons["decisions"]))
    assert got == {"act: debt #, pressure #": kinds["act"], "abstain: pressure < # (healthy)": kinds["abstain"]}
    titles = chart_titles(at)
    assert "When the controller abstained (dark) or acted (light)" in titles
    band = [s for s in _specs(at) if _title(s).startswith("When the controller abstained")][0]
    assert band["mark"]["type"] == "rect"  # a band, not a 0/100 % line


# ------------------------------------------------------------------ 6. SQL page
def test_sql_examples_filter_by_the_selected_run_and_errors_do_not_linger(app, dash_store):
    root, _ = dash_store
    at = app(root, "sql", run=HEALTHY_RUN)
    at.selectbox(key="sql_example").set_value("Tokens per expert").run()
    text = at.text_area(key="sql_text").value
    assert f"WHERE run_id = '{HEALTHY_RUN}'" in text
    at.form_submit_button[0].click().run()
    result = at.dataframe[0].value
    assert result["tokens"].sum() == 20 * 2 * 4 * 25  # the healthy run only, not every run
    at.text_area(key="sql_text").set_value("SELECT nope FROM routing")
    at.form_submit_button[0].click().run()
    assert at.error
    at.selectbox(key="sql_example").set_value("Alerts raised").run()
    assert not at.error and not at.exception  # the old error is not shown over the new example
    assert f"run_id = '{HEALTHY_RUN}'" in at.text_area(key="sql_text").value
    at.sidebar.selectbox[0].set_value(MAIN_RUN).run()  # untouched example follows the sidebar run
    assert f"run_id = '{MAIN_RUN}'" in at.text_area(key="sql_text").value


def test_sql_example_text_for_no_run():
    from dashboard.data import SQL_EXAMPLES, sql_example

    for name in SQL_EXAMPLES:
        assert "{run}" not in sql_example(name, None) and "{run}" not in sql_example(name, "r1")


# ------------------------------------------------------------------ 7. run picker
def test_unknown_run_in_the_link_is_said(app, dash_store):
    root, _ = dash_store
    at = app(root, "health", run="no-such-run")
    shown = at.sidebar.selectbox[0].value
    assert any("no-such-run" in w.value and "not in the store" in w.value and shown in w.value
               for w in at.warning)
    at.sidebar.selectbox[0].set_value(HEALTHY_RUN).run()  # once the user picks a run the note goes
    assert not any("no-such-run" in w.value for w in at.warning)


def test_known_run_in_the_link_has_no_warning(app, dash_store):
    root, _ = dash_store
    at = app(root, "health", run=HEALTHY_RUN)
    assert at.sidebar.selectbox[0].value == HEALTHY_RUN and not at.warning


def test_decision_spans_cover_the_steps_each_decision_governed():
    from dashboard.status import decision_spans

    df = pd.DataFrame({"layer": [0, 0, 0, 1], "step_start": [9, 19, 29, 9], "step": [9, 19, 29, 9]})
    got = decision_spans(df).set_index(["layer", "step_start"])["step_end"]
    assert got[(0, 9)] == 19 and got[(0, 19)] == 29 and got[(0, 29)] == 39  # last: + median gap 10
    assert got[(1, 9)] == 10  # a single decision: one step wide


def test_single_expert_layer_is_white_not_hot():
    """n = 1 (Bio-MoE before growth): its 100 % share is its uniform share, drawn white, and it is OK."""
    from dashboard.charts import SHARE_UNIFORM, share_scale

    scale = share_scale(1).to_dict()
    assert scale["domain"] == [0.0, 1.0] and scale["range"][-1] == SHARE_UNIFORM


def test_threshold_labels_have_a_halo_over_the_lines():
    """Newcomer 2: threshold labels were drawn straight over the metric lines (hard to read).
    Each label is now drawn twice, first with a white stroke (a halo), then plain on top."""
    from dashboard.charts import TOP2_THRESHOLDS, _thresholds

    spec = _thresholds(list(TOP2_THRESHOLDS)).to_dict()
    texts = [layer["mark"] for layer in spec["layer"] if layer["mark"]["type"] == "text"]
    assert len(texts) == 4   # (below, above) x (halo, plain)
    halos, plain = texts[:2], texts[2:]
    assert all(m.get("stroke") == "white" and m.get("strokeWidth", 0) >= 3 for m in halos)
    assert all("stroke" not in m for m in plain)
