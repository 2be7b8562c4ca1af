"""The real thing: `chrono dashboard` on a free port, every page in headless Chromium.

Every page is opened for the collapsing run and for the healthy run; screenshots
(``<run>-<page>.png``) land in the test's tmp dir (``--basetemp`` to keep them).
docs/dashboard.md describes what they show.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import chrono
from dashboard.server import stop, wait_ready
from tests.conftest import free_port, require_tool
from tests.dashboard.store_fixture import HEALTHY_RUN, MAIN_RUN, build

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1400, "height": 900}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# url path -> (heading, texts that must be visible, chart titles that must be drawn), per run
STRIP = "Alert state per layer over steps"
PAGES = {
    "": ("Runs", ["Compare runs", "Alerts raised (all runs)", "Collapse confirmed", "worst health first"],
         ["Neff / experts (mean over layers)", "Top-2 share (mean over layers)", "Training loss"]),
    "routing": ("Routing", ["Token assignments", "163,840", "4 × 8", "uniform share 1/8"],
                ["Expert share over steps, layer 0", "Share of each layer's tokens, whole run",
                 "Top-k gate weight distribution, layer 0"]),
    "health": ("Health", ["Neff (mean over layers)", "Dead experts (all layers)"],
               [STRIP, "Effective experts (Neff = exp(entropy))", "Top-2 share (tokens in the 2 largest experts)",
                "Routing entropy", "experts per layer"]),
    "alerts": ("Alerts", ["Active now", "First raised at step"], ["Alert timeline"]),
    "governance": ("Governance", ["Decisions", "Reasons", "Latest decisions", "Max pressure now"],
                   ["Topology debt", "Pressure (EMA of debt)", "Lens scale s", "Harm-guard backoff",
                    "When the controller abstained"]),
    "lifecycle": ("Lifecycle & workloads", ["Expert lifecycle", "Workload signals"],
                  ["Lifecycle events", "Experts per layer after each event", "Loss", "VAR tiers",
                   "Astarte null channel"]),
    "sql": ("SQL", ["Read-only DuckDB over the store", f"Sidebar run: {MAIN_RUN}"], []),
}
HEALTHY_PAGES = {
    "": PAGES[""],
    "routing": ("Routing", ["Token assignments", "4,000", "2 × 4", "uniform share 1/4"],
                ["Expert share over steps, layer 0", "Share of each layer's tokens, whole run",
                 "Mean top-k gate weight per assignment, layer 0"]),
    "health": ("Health", ["no change"], [STRIP, "Effective experts (Neff = exp(entropy))",
                                         "Top-2 share (tokens in the 2 largest experts)", "Routing entropy",
                                         "experts per layer"]),
    "alerts": ("Alerts", ["No alert was ever raised"], []),
    "governance": ("Governance", ["Abstaining now", "2 of 2"],
                   ["Topology debt", "When the controller abstained"]),
    "lifecycle": ("Lifecycle & workloads", ["No lifecycle events", "Workload signals"], ["Loss"]),
    "sql": ("SQL", [f"Sidebar run: {HEALTHY_RUN}"], []),
}
RUNS = {MAIN_RUN: PAGES, HEALTHY_RUN: HEALTHY_PAGES}


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "store"
    facts = build(root)
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "chrono_cli", "--root", str(root), "dashboard",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, "127.0.0.1", port, timeout=90)
        yield f"http://127.0.0.1:{port}", root, facts
    finally:
        stop(proc)
        log.close()


def _settle(page, n_charts: int) -> None:
    """Wait until the script finished and the expected charts have a drawn size."""
    page.wait_for_selector('[data-testid="stApp"]')
    if n_charts:
        page.wait_for_function(
            "n => [...document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks')]"
            ".filter(e => e.getBoundingClientRect().width > 100 && e.getBoundingClientRect().height > 50)"
            ".length >= n", arg=n_charts, timeout=60_000)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=60_000)


def _screenshot(page, path, n_charts: int) -> None:
    """Whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": max(VIEWPORT["height"], int(height) + 40)})
    _settle(page, n_charts)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(VIEWPORT)


def _picker_offers(page, run: str, timeout_s: float) -> bool:
    """Open the sidebar's run picker until it lists ``run`` (options exist only while it is open)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.get_by_role("combobox", name="Run").click()
        try:
            page.get_by_role("option", name=run).wait_for(state="visible", timeout=1000)
            return True
        except Exception:  # playwright TimeoutError: not listed yet; close the list and look again
            page.keyboard.press("Escape")
    return False


def test_every_page_in_chromium(server, tmp_path):
    chromium = require_tool("/usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, root, facts = server
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for run, pages in RUNS.items():
            for path, (heading, texts, titles) in pages.items():
                page.goto(f"{url}/{path}?run={run}")
                sync_api.expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible(timeout=60_000)
                _settle(page, len(titles))
                for text in texts:
                    sync_api.expect(page.get_by_text(text, exact=False).first).to_be_visible()
                for title in titles:  # vega-embed draws SVG: its title, axes and legends are text
                    sync_api.expect(page.get_by_role("img").filter(has_text=title).first).to_be_visible()
                assert not page.locator('[data-testid="stException"]').count(), (run, path)
                assert not page.get_by_text("Page not found").count(), (run, path)
                assert not page.get_by_text("is not in the store").count(), (run, path)  # ?run= was honoured
                _screenshot(page, shots / f"{run}-{path or 'runs'}.png", len(titles))

        # a link to a run that is not in the store says so, and shows another run
        page.goto(f"{url}/health?run=no-such-run")
        sync_api.expect(page.get_by_text("(?run=no-such-run) is not in the store")).to_be_visible(timeout=60_000)

        # SQL console: a query returns rows, a write is refused with a clear message
        page.goto(f"{url}/sql")
        box = page.get_by_label("Query")
        box.fill(f"SELECT layer, sum(tokens) AS tokens FROM routing WHERE run_id = '{MAIN_RUN}' GROUP BY ALL")
        page.get_by_role("button", name="Run", exact=True).click()
        sync_api.expect(page.get_by_text("4 rows × 2 columns")).to_be_visible(timeout=30_000)
        sync_api.expect(page.get_by_role("button", name="Download Parquet")).to_be_visible()
        _screenshot(page, shots / "sql_result.png", 0)
        box.fill("DROP VIEW routing")
        page.get_by_role("button", name="Run", exact=True).click()
        sync_api.expect(page.get_by_text("only read-only queries are allowed")).to_be_visible(timeout=30_000)

        # live: parts written while the page is open show up by themselves
        page.goto(f"{url}/routing?run={MAIN_RUN}")
        _settle(page, 3)
        sync_api.expect(page.get_by_text(f"{facts['tokens']:,}")).to_be_visible()
        with chrono.open_run(root, MAIN_RUN) as w:
            w.log_routing(10_000, np.arange(4), np.full((4, 8), 1000))
        sync_api.expect(page.get_by_text(f"{facts['tokens'] + 32_000:,}")).to_be_visible(timeout=30_000)
        # a run recorded while the page is open joins the sidebar's run picker without a reload
        with chrono.open_run(root, "late-run", model={"name": "late"}) as w:
            w.log_routing(0, 0, np.full(4, 10))
        assert _picker_offers(page, "late-run", timeout_s=30), "the run picker did not offer the new run"
        browser.close()
    assert not errors, errors
    want = [f"{run}-{p or 'runs'}.png" for run, pages in RUNS.items() for p in pages] + ["sql_result.png"]
    assert sorted(p.name for p in shots.iterdir()) == sorted(want)
