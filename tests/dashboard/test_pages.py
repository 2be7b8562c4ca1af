"""AppTest for every page against the fixture store: no exceptions, expected widgets and numbers."""
from __future__ import annotations

import numpy as np
import pytest

import chrono
from tests.dashboard.conftest import chart_titles, metrics
from tests.dashboard.store_fixture import EXPERTS, HEALTHY_RUN, LAYERS, MAIN_RUN, STEPS


def test_missing_store_shows_first_run_page(app, tmp_path):
    at = app(tmp_path / "does-not-exist")
    assert "record your first run" in at.subheader[0].value
    assert any("demo --no-serve" in c.value for c in at.code)
    assert any("probes.attach" in c.value for c in at.code)
    assert not at.metric and not at.get("vega_lite_chart")


def test_empty_store_dir_shows_first_run_page(app, store_root):
    at = app(store_root)
    assert "record your first run" in at.subheader[0].value
    assert "holds no run directories" in at.markdown[0].value


def test_runs_page(app, dash_store):
    root, facts = dash_store
    at = app(root, "runs")
    m = metrics(at)
    assert m["Runs"] == "3"
    assert m["Routing steps (all runs)"] == f"{STEPS + 20:,}"
    assert m["Alerts raised (all runs)"] == str(facts["raised"])
    table = at.dataframe[0].value
    assert set(table["run"]) == {MAIN_RUN, HEALTHY_RUN, "fresh-run"}
    main = table[table["run"] == MAIN_RUN].iloc[0]
    assert main["layers × experts"] == f"{LAYERS} × {EXPERTS}, top-2"
    assert main["tokens routed"] == facts["tokens"]
    assert main["model"] == "fixture-moe"
    assert set(at.multiselect[0].value) == {MAIN_RUN, HEALTHY_RUN, "fresh-run"}
    assert chart_titles(at) == ["Neff / experts (mean over layers)", "Top-2 share (mean over layers)",
                                "Training loss"]
    at.multiselect[0].set_value([HEALTHY_RUN]).run()
    assert not at.exception and len(at.get("vega_lite_chart")) == 3


def test_routing_page(app, dash_store):
    root, facts = dash_store
    at = app(root, "routing", run=MAIN_RUN)
    m = metrics(at)
    assert m["Token assignments"] == f"{facts['tokens']:,}"
    assert m["Layers × experts"] == f"{LAYERS} × {EXPERTS}"
    assert m["Steps"] == f"0 – {STEPS - 1}"
    titles = chart_titles(at)
    assert titles[:2] == ["Expert share over steps, layer 0", "Share of each layer's tokens, whole run"]
    assert titles[2] == "Top-k gate weight distribution, layer 0"  # layer 0 has per-token rows
    at.selectbox(key="routing_layer").set_value(3).run()
    assert not at.exception
    titles = chart_titles(at)
    assert titles[0] == "Expert share over steps, layer 3"
    assert titles[2] == "Mean top-k gate weight per assignment, layer 3"  # no tokens rows: from weight_sum


def test_run_picker_switches_run(app, dash_store):
    root, _ = dash_store
    at = app(root, "routing", run=MAIN_RUN)
    at.sidebar.selectbox[0].set_value(HEALTHY_RUN).run()
    assert not at.exception
    assert metrics(at)["Layers × experts"] == "2 × 4"
    assert metrics(at)["Token assignments"] == f"{20 * 2 * 4 * 25:,}"


def test_health_page(app, dash_store):
    root, facts = dash_store
    g = facts["last_global"]
    at = app(root, "health", run=MAIN_RUN)
    m = metrics(at)
    assert m["Snapshot step"] == str(STEPS - 1)
    assert m["Neff (mean over layers)"] == f"{g['neff']:.2f} of {EXPERTS}"
    assert m["Top-2 share (mean)"] == f"{g['top2_share']:.1%}"
    assert m["Dead experts (all layers)"] == str(g["dead"])
    assert at.multiselect(key="health_layers").value == list(range(LAYERS))
    assert chart_titles(at) == [
        "Alert state per layer over steps (grey OK, orange PRE_COLLAPSE, red COLLAPSE_CONFIRMED)",
        "Effective experts (Neff = exp(entropy))", "Top-2 share (tokens in the 2 largest experts)",
        "Routing entropy", "Dead (solid) and nearly dead (dashed, < 1 %) experts per layer"]
    at.multiselect(key="health_layers").set_value([-1]).run()  # global only: no per-layer dead panels
    assert not at.exception and len(at.get("vega_lite_chart")) == 4


def test_health_without_snapshots_says_how(app, dash_store):
    root, _ = dash_store
    at = app(root, "health", run="fresh-run")
    assert "No snapshots" in at.info[0].value and "chrono snapshot fresh-run" in at.info[0].value


def test_alerts_page(app, dash_store):
    root, facts = dash_store
    at = app(root, "alerts", run=MAIN_RUN)
    m = metrics(at)
    assert m["Raised"] == str(facts["raised"]) and int(m["Raised"]) > 0
    assert m["Cleared"] == str(facts["cleared"])
    assert m["Active now"] == str(facts["raised"] - facts["cleared"])
    table = at.dataframe[0].value
    assert len(table) == facts["raised"] + facts["cleared"]
    assert {"neff", "top2_share", "dead", "consecutive"} <= set(table.columns)
    assert chart_titles(at)[0].startswith("Alert timeline")
    at.multiselect(key="alert_kinds").set_value(["cleared"]).run()
    assert len(at.dataframe[0].value) == facts["cleared"]


def test_alerts_page_healthy_run(app, dash_store):
    root, _ = dash_store
    at = app(root, "alerts", run=HEALTHY_RUN)
    assert "No alert was ever raised" in at.success[0].value and "2 snapshots" in at.success[0].value


def test_governance_page(app, dash_store):
    root, facts = dash_store
    at = app(root, "governance", run=MAIN_RUN)
    m = metrics(at)
    assert m["Decisions"] == str(facts["decisions"])
    assert m["Latest step"] == str(STEPS - 1)
    assert chart_titles(at) == ["Topology debt", "Pressure (EMA of debt)", "Heat (pressure clipped to 0-1)",
                                "Lens scale s", "Harm-guard backoff",
                                "When the controller abstained (dark) or acted (light)"]
    reasons = at.dataframe[0].value
    assert reasons["decisions"].sum() == facts["decisions"]
    latest = at.dataframe[1].value
    assert len(latest) == facts["decisions"] and "reason" in latest.columns


def test_governance_page_without_decisions(app, dash_store):
    root, _ = dash_store
    at = app(root, "governance", run="fresh-run")
    assert "No controller decisions" in at.info[0].value


def test_lifecycle_page(app, dash_store):
    root, _ = dash_store
    at = app(root, "lifecycle", run=MAIN_RUN)
    m = metrics(at)
    assert m == {"prune": "1", "split": "0"}  # split was proposed only
    assert at.dataframe[0].value["event"].tolist() == ["prune", "split"]
    assert at.dataframe[0].value["source_expert"].tolist() == ["–", "0"]  # a missing value is "–", not "None"
    assert set(at.multiselect(key="signal_names").value) == {"accuracy", "astarte.null_norm", "loss",
                                                             "var.expensive_fraction"}
    titles = chart_titles(at)
    assert titles[:2] == ["Lifecycle events (filled: applied, hollow: proposed only)",
                          "Experts per layer after each event"]
    assert sorted(titles[2:]) == ["Accuracy", "Astarte null channel", "Loss", "VAR tiers"]


def test_sql_page_runs_queries_and_offers_downloads(app, dash_store):
    root, _ = dash_store
    at = app(root, "sql")
    at.text_area(key="sql_text").set_value(
        f"SELECT count(*) AS n FROM routing WHERE run_id = '{MAIN_RUN}'")
    at.form_submit_button[0].click().run()
    assert not at.exception and not at.error
    assert at.dataframe[0].value["n"].iloc[0] == STEPS * LAYERS * EXPERTS
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels == ["Download CSV", "Download Parquet"]


def test_sql_page_row_limit(app, dash_store):
    root, _ = dash_store
    at = app(root, "sql")
    at.text_area(key="sql_text").set_value("SELECT * FROM routing")
    at.number_input(key="sql_limit").set_value(100)
    at.form_submit_button[0].click().run()
    assert len(at.dataframe[0].value) == 100
    assert "row limit reached" in at.markdown[-1].value


@pytest.mark.parametrize("sql", ["DROP VIEW routing", "CREATE TABLE x AS SELECT 1",
                                 "COPY routing TO 'x.csv'", "SELECT 1; DELETE FROM routing"])
def test_sql_page_refuses_writes(app, dash_store, sql):
    root, _ = dash_store
    at = app(root, "sql")
    at.text_area(key="sql_text").set_value(sql)
    at.form_submit_button[0].click().run()
    assert not at.exception
    assert "only read-only queries are allowed" in at.error[0].value
    assert not at.get("download_button")


def test_new_parts_appear_without_restart(app, store_root, monkeypatch):
    from dashboard import data

    monkeypatch.setattr(data, "CHECK_EVERY_S", 0.0)
    with chrono.open_run(store_root, "live", model={"name": "live"}) as w:
        w.log_routing(0, 0, np.array([5, 5]))
    at = app(store_root, "routing", run="live")
    assert metrics(at)["Token assignments"] == "10"
    with chrono.open_run(store_root, "live") as w:
        w.log_routing(1, 0, np.array([30, 0]))
    at.run()  # what the live fragment does on its timer
    assert metrics(at)["Token assignments"] == "40"
    assert metrics(at)["Steps"] == "0 – 1"
