"""newcomer2: dashboard pages an operator reads (welcome on a mistyped root, Governance, legends)."""
from __future__ import annotations

import json

import pytest

import chrono
from chrono.governance import CONFIG_NAME
from chrono.store import run_dir
from tests.dashboard.conftest import chart_titles


def test_dashboard_welcome_names_the_store_inside_a_mistyped_root(app, tmp_path):
    # The welcome page said "it holds no run directories" and nothing else for the parent
    # directory of a store (the most common wrong --root after a typo-free `cd ..`).
    parent, store = tmp_path / "project", tmp_path / "project" / "store"
    with chrono.open_run(store, "r1", model={"layers": [0], "experts_per_layer": {"0": 2}, "top_k": 1}) as w:
        w.log_routing(0, 0, [3, 1])
    at = app(parent)
    assert "record your first run" in at.subheader[0].value
    assert [w.value for w in at.warning] == [
        f"no runs under {parent}; it holds the store {store} (pass that as the root): "
        f"`chrono --root DIR dashboard` with the store's directory."]


def _decision(step, layer, actuator, pressure, reason):
    return {"step": step, "layer": layer, "actuator": actuator, "debt": 0.2, "pressure": pressure,
            "heat": pressure, "forgetting": 0.02 + 0.1 * pressure, "lens_scale": 0.0, "backoff": 1.0,
            "abstain": False, "reason": reason, "neff": 3.0, "top2_share": 0.6}


@pytest.mark.parametrize("config,said,pressure_title", [
    (None, "Governed by **informed-lens** · faithful policy (ChronoMoE)", "Pressure (EMA of debt)"),
    ({"mode": "setpoint", "neff_target": 0.85, "actuator": "bias"},
     "Governed by **bias** · setpoint policy: PI feedback to Neff = 0.85·n", "Effort u (PI output, stored as pressure)"),
])
def test_governance_page_says_what_governs_the_run(app, tmp_path, config, said, pressure_title):
    # With one actuator the page never named it (the table dropped the column "named in the
    # selector above", a selector shown only for several), and a setpoint run's effort was
    # drawn as "Pressure (EMA of debt)".
    actuator = config["actuator"] if config else "informed-lens"
    root = tmp_path / "store"
    with chrono.open_run(root, "g", model={"layers": [0], "experts_per_layer": {"0": 4}, "top_k": 1}) as w:
        for step in (9, 19):
            w.log_routing(step, 0, [5, 3, 1, 1])
            w.log_rows("decisions", [_decision(step, 0, actuator, 0.3, "act: debt 0.2, pressure 0.3")])
    if config:
        (run_dir(root, "g") / CONFIG_NAME).write_text(json.dumps(config))
    at = app(root, "governance", run="g")
    assert any(c.value.startswith(said) for c in at.caption), [c.value for c in at.caption]
    assert pressure_title in chart_titles(at)
    labels = [m.label for m in at.metric]
    assert ("Max effort u now" in labels) == bool(config) and ("Max pressure now" in labels) != bool(config)


def test_share_legend_title_fits_a_half_width_chart():
    # On the Routing page the whole-run heatmap sits in a half-width column, and its one-line
    # legend title was cut off at "... blue = starved, pu" (screenshot 2026-12-01, 1400 px wide).
    # The column showed the first 73 characters of that title; lines of at most 60 fit.
    from dashboard.charts import share_legend

    title = share_legend(8).to_dict()["title"]
    lines = [title] if isinstance(title, str) else title
    assert " ".join(lines) == "share of tokens: white = uniform share 1/8 = 12.5%, blue = starved, purple = hot"
    assert len(lines) > 1 and max(len(l) for l in lines) <= 60, lines


def test_abstain_band_starts_where_the_decisions_start():
    # The band's step axis began at 0 (Vega's zero default for a quantitative scale) while the
    # line charts beside it began at the first decision (14 in a run governed from step 14):
    # the two did not line up (screenshot 2026-12-01).
    import pandas as pd

    from dashboard import charts, status

    binned = pd.DataFrame({"layer": [0, 0, 1, 1], "layer_name": ["layer 0", "layer 0", "layer 1", "layer 1"],
                           "step_start": [14, 19, 14, 19], "step": [14, 19, 14, 19],
                           "abstain_fraction": [1.0, 0.0, 0.0, 1.0], "decisions": [1, 1, 1, 1]})
    spec = charts.abstain_band(status.decision_spans(binned)).to_dict()
    assert spec["encoding"]["x"]["scale"]["zero"] is False
