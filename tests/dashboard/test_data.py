"""Loaders: pixel-budget binning keeps totals, versions follow the store."""
from __future__ import annotations

import numpy as np

import chrono
from dashboard import data


def test_heatmap_is_binned_to_the_budget_and_keeps_every_token(store_root, monkeypatch):
    steps, experts = 1000, 64
    counts = np.random.default_rng(0).integers(0, 50, size=(steps, 1, experts))
    with chrono.open_run(store_root, "wide") as w:
        w.log_routing(np.arange(steps)[:, None], np.zeros((steps, 1)), counts)
    width = data.bin_width(0, steps - 1, 40)
    assert width == 25
    heat = data.query(data.ROUTING_HEATMAP_SQL, run="wide", root=store_root, layer=0, lo=0, w=width)
    assert heat["step_start"].nunique() == 40 and len(heat) == 40 * experts
    assert heat["tokens"].sum() == counts.sum()
    first = counts[:25, 0, :].sum(axis=0)
    got = heat[heat["step_start"] == 0].sort_values("expert")
    np.testing.assert_array_equal(got["tokens"].to_numpy(), first)
    np.testing.assert_allclose(got["share"].to_numpy(), first / first.sum())
    np.testing.assert_allclose(heat.groupby("step_start")["share"].sum(), 1.0)


def test_bin_width():
    assert data.bin_width(0, 99, 300) == 1
    assert data.bin_width(0, 9_999, 300) == 34
    assert data.bin_width(None, None, 300) == 1


def test_version_changes_only_for_the_written_run(store_root, monkeypatch):
    monkeypatch.setattr(data, "CHECK_EVERY_S", 0.0)
    for run in ("a", "b"):
        with chrono.open_run(store_root, run) as w:
            w.log_routing(0, 0, np.array([1, 1]))
    store = data.get_store(store_root)
    va, vb = store.version("a"), store.version("b")
    with chrono.open_run(store_root, "a") as w:
        w.log_signal(1, "loss", 1.0)
    store = data.get_store(store_root)
    assert store.version("a") != va and store.version("b") == vb
    names = data.query(data.SIGNAL_NAMES_SQL, run="a", root=store_root)
    assert names["name"].tolist() == ["loss"]


def test_dashboard_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, dashboard, dashboard.data, dashboard.charts, dashboard.ui; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_part_landing_in_the_same_mtime_tick_reaches_the_pages(store_root, monkeypatch):
    """Two parts in one mtime tick: the second one must still show (it did not before the follower)."""
    import os

    from chrono.store import table_dir

    monkeypatch.setattr(data, "CHECK_EVERY_S", 0.0)
    w = chrono.open_run(store_root, "tick")
    w.log_routing(0, 0, np.array([3, 4]))
    w.flush()
    sql = "SELECT sum(tokens) AS n FROM routing WHERE run_id = $run"
    assert data.query(sql, run="tick", root=store_root)["n"].iloc[0] == 7
    d = table_dir(store_root, "routing", "tick")
    st = os.stat(d)
    w.log_routing(1, 0, np.array([10, 20]))
    w.flush()
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))   # the rename left the directory's mtime as it was
    assert data.query(sql, run="tick", root=store_root)["n"].iloc[0] == 37
    w.close()


def test_runs_appear_and_disappear(store_root, monkeypatch):
    from chrono.store import delete_run

    monkeypatch.setattr(data, "CHECK_EVERY_S", 0.0)
    with chrono.open_run(store_root, "a") as w:
        w.log_routing(0, 0, np.array([1, 1]))
    assert data.run_set(store_root) == {"a"}
    with chrono.open_run(store_root, "b") as w:
        w.log_routing(0, 0, np.array([1, 1]))
    assert data.run_set(store_root) == {"a", "b"}
    delete_run(store_root, "a")
    assert data.run_set(store_root) == {"b"}
    assert data.query("SELECT DISTINCT run_id FROM routing", root=store_root)["run_id"].tolist() == ["b"]


def test_signal_table_says_which_layers_not_a_count(store_root, monkeypatch):
    """Newcomer 2: the signals table's ``layers`` column was count(DISTINCT layer): 0 for a
    run-wide signal, read as "layer 0". It now names them: 'run-wide' and/or the layers."""
    monkeypatch.setattr(data, "CHECK_EVERY_S", 0.0)
    with chrono.open_run(store_root, "sig") as w:
        w.log_routing(0, 0, np.array([1, 1]))
        w.log_signal(1, "loss", 2.0)
        for layer in (10, 2, 0):
            w.log_signal(1, "probes.padding_excluded", 4.0, layer=layer)
        w.log_signal(1, "mixed", 1.0)
        w.log_signal(2, "mixed", 1.0, layer=1)
    names = data.query(data.SIGNAL_NAMES_SQL, run="sig", root=store_root)
    assert dict(zip(names["name"], names["layers"])) == {
        "loss": "run-wide", "probes.padding_excluded": "0, 2, 10", "mixed": "run-wide, 1"}
