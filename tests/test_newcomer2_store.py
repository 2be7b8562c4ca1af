"""newcomer2: a mistyped store root is said, not silently an empty store."""
from __future__ import annotations

import json
import warnings

import pytest

import chrono
from chrono_cli.main import main


@pytest.fixture
def nested(tmp_path):
    """<tmp>/project/store holds one run; <tmp>/project is what a user passes by mistake."""
    store = tmp_path / "project" / "store"
    with chrono.open_run(store, "r1", model={"layers": [0], "experts_per_layer": {"0": 2}, "top_k": 1}) as w:
        w.log_routing(0, 0, [3, 1])
    return tmp_path / "project", store


def _warned(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in got if issubclass(w.category, UserWarning)]


def test_connect_to_a_missing_root_warns_and_stays_an_empty_store(tmp_path):
    con, msgs = _warned(lambda: chrono.connect(tmp_path / "chrono_rusn"))
    assert con.execute("SELECT count(*) FROM routing").fetchall() == [(0,)]   # the documented contract
    assert msgs == [f"no chrono store at {tmp_path / 'chrono_rusn'}: the directory does not exist"]
    lf, msgs = _warned(lambda: chrono.read(tmp_path / "chrono_rusn", "routing"))
    assert lf.collect().height == 0 and len(msgs) == 1 and "does not exist" in msgs[0]


def test_connect_to_the_parent_of_a_store_names_the_store(nested):
    parent, store = nested
    _, msgs = _warned(lambda: chrono.connect(parent))
    assert msgs == [f"no runs under {parent}; it holds the store {store} (pass that as the root)"]


def test_a_store_and_an_empty_directory_give_no_warning(nested, tmp_path):
    _, store = nested
    (tmp_path / "fresh").mkdir()
    for root in (store, tmp_path / "fresh"):   # a store; a directory a writer is about to fill
        con, msgs = _warned(lambda: chrono.connect(root))
        assert msgs == []
    assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]


def test_chrono_runs_on_the_parent_of_a_store_says_where_the_store_is(nested, capsys):
    parent, store = nested
    assert main(["--root", str(parent), "runs"]) == 0
    out, err = capsys.readouterr()
    assert "(no rows)" in out
    assert err == f"chrono: note: no runs under {parent}; it holds the store {store} (pass that as the root)\n"
    assert main(["--root", str(store), "runs"]) == 0
    out, err = capsys.readouterr()
    assert "r1" in out and err == ""


def test_dashboard_welcome_names_the_store_inside_a_mistyped_root(nested, monkeypatch):
    # The welcome page said "it holds no run directories" and nothing else for the parent
    # directory of a store (the most common wrong --root after a typo-free `cd ..`).
    from streamlit.testing.v1 import AppTest

    from tests.dashboard.conftest import APP

    parent, store = nested
    monkeypatch.setenv("CHRONO_ROOT", str(parent))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
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
def test_governance_page_says_what_governs_the_run(tmp_path, monkeypatch, config, said, pressure_title):
    # With one actuator the page never named it (the table dropped the column "named in the
    # selector above", a selector shown only for several), and a setpoint run's effort was
    # drawn as "Pressure (EMA of debt)".
    from streamlit.testing.v1 import AppTest

    from chrono.governance import CONFIG_NAME
    from chrono.store import run_dir
    from tests.dashboard.conftest import APP, chart_titles

    actuator = config["actuator"] if config else "informed-lens"
    root = tmp_path / "store"
    with chrono.open_run(root, "g", model={"layers": [0], "experts_per_layer": {"0": 4}, "top_k": 1}) as w:
        for step in (9, 19):
            w.log_routing(step, 0, [5, 3, 1, 1])
            w.log_rows("decisions", [_decision(step, 0, actuator, 0.3, "act: debt 0.2, pressure 0.3")])
    if config:
        (run_dir(root, "g") / CONFIG_NAME).write_text(json.dumps(config))
    monkeypatch.setenv("CHRONO_ROOT", str(root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "g"
    at.run()
    at.switch_page("views/governance.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
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
