"""Fixtures for the dashboard tests: a filled store (built once) and an AppTest factory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dashboard.store_fixture import build

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py")


@pytest.fixture(scope="session")
def dash_store(tmp_path_factory):
    """(root, facts): the fixture store of store_fixture.build and what it must show."""
    root = tmp_path_factory.mktemp("dash") / "store"
    facts = build(root)
    return root, facts


@pytest.fixture
def app(monkeypatch):
    """make(root, page=None, run=None) -> AppTest rendered on that page."""
    from streamlit.testing.v1 import AppTest

    def make(root, page: str | None = None, run: str | None = None):
        monkeypatch.setenv("CHRONO_ROOT", str(root))
        at = AppTest.from_file(APP, default_timeout=60)
        if run is not None:
            at.query_params["run"] = run
        at.run()
        if page is not None:
            at.switch_page(f"views/{page}.py")
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return make


def metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def chart_titles(at) -> list[str]:
    out = []
    for c in at.get("vega_lite_chart"):
        title = json.loads(c.proto.spec).get("title")
        out.append(title.get("text") if isinstance(title, dict) else title)
    return out
