"""The Specialization page: AppTest against stores with and without per-token rows, and Chromium."""
from __future__ import annotations

import pytest

import chrono
from chrono.analysis import Scope, analyze
from tests.analysis import hand_store, spec_store
from tests.dashboard.conftest import chart_titles, metrics

TITLES = ["Co-activation lift, layer 0", "Routing drift: each window vs the last (JS divergence)",
          "Busiest GPU ÷ mean GPU load per layer"]


@pytest.fixture(scope="module")
def spec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec") / "store"
    spec_store.build(root)
    hand_store.build(root)
    return root


def test_specialization_page_shows_every_part(app, spec_root):
    at = app(spec_root, "specialization", run=spec_store.RUN)
    assert [h.value for h in at.subheader] == ["Experts chosen together", "Tokens each expert receives",
                                               "Drift over the run", "Expert placement plan"]
    assert chart_titles(at) == TITLES
    table = at.dataframe[0].value
    assert len(table) == spec_store.EXPERTS
    # expert 0 of layer 0 takes the bytes with b mod 8 = 0: the space is the most frequent
    assert table.loc[table["expert"] == 0, "top_tokens"].iloc[0].startswith("·")
    voc = analyze(chrono.connect(spec_root), "vocabulary", Scope(spec_store.RUN, layer=0))
    kl0 = [r["expert_kl"] for r in voc.table.to_pylist() if r["expert"] == 0][0]
    assert table.loc[table["expert"] == 0, "kl"].iloc[0] == pytest.approx(kl0)
    m = metrics(at)
    from chrono.analysis.placement_io import plan_run

    rep = plan_run(chrono.connect(spec_root), Scope(spec_store.RUN), 4)
    assert m["Max/mean GPU load, trivial"] == f"{rep.summary()['mean_before_ratio']:.3f}"
    assert m["Max/mean GPU load, planned"] == f"{rep.summary()['mean_after_ratio']:.3f}"


def test_specialization_page_layer_and_plan_controls(app, spec_root):
    at = app(spec_root, "specialization", run=spec_store.RUN)
    at.selectbox(key="spec_layer").set_value(1).run()
    assert not at.exception and chart_titles(at)[0] == "Co-activation lift, layer 1"
    at.number_input(key="spec_gpus").set_value(3).run()  # 8 experts do not split over 3 GPUs
    assert not at.exception
    assert any("do not split evenly over 3 GPUs" in i.value for i in at.info)


def test_specialization_page_without_token_rows_explains(app, spec_root):
    at = app(spec_root, "specialization", run=hand_store.AGG_RUN)
    assert any("tokens=" in i.value for i in at.info)
    # drift (routing) and the placement plan still work without per-token rows
    assert chart_titles(at) == ["Routing drift: each window vs the last (JS divergence)",
                                "Busiest GPU ÷ mean GPU load per layer"]


@pytest.mark.browser
def test_specialization_page_in_chromium(spec_root, tmp_path):
    from dashboard.server import serve, stop
    from tests.conftest import free_port, require_tool

    chromium = require_tool("/usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    proc = serve(spec_root, port=port, timeout=90, log_file=tmp_path / "server.log")
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                         args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/specialization?run={spec_store.RUN}")
            sync_api.expect(page.get_by_role("heading", name="Specialization", exact=True)).to_be_visible(
                timeout=60_000)
            page.wait_for_function(
                "n => [...document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks')]"
                ".filter(e => e.getBoundingClientRect().width > 100).length >= n", arg=3, timeout=60_000)
            for title in TITLES:
                sync_api.expect(page.get_by_role("img").filter(has_text=title).first).to_be_visible()
            sync_api.expect(page.get_by_text("Strongest pair").first).to_be_visible()
            assert not page.locator('[data-testid="stException"]').count()
            height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
            page.set_viewport_size({"width": 1400, "height": int(height) + 40})
            page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                                   timeout=60_000)
            for text in ("Max/mean GPU load, planned", "Strongest pair"):
                sync_api.expect(page.get_by_text(text).first).to_be_visible(timeout=30_000)
            page.locator('[data-testid="stDataFrame"] canvas').first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "specialization.png"), full_page=True)
            browser.close()
        assert not errors, errors
    finally:
        stop(proc)
