"""Exporter unit tests: exposition parsed back equals the store / the live handle."""
from __future__ import annotations

import logging
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from chrono.exporters.prometheus import (
    DECISION_GAUGES, SNAPSHOT_GAUGES, Exporter, ExporterError, LiveSource, StoreSource, serve)


def parse(text) -> dict:
    """{(sample name, frozenset(labels)): value} of one exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def series(parsed, name) -> dict:
    """{labels dict as frozenset: value} of one sample name."""
    return {labels: v for (n, labels), v in parsed.items() if n == name}


def lab(**kw):
    return frozenset((k, str(v)) for k, v in kw.items())


# ------------------------------------------------------------------ store source
def test_exposition_equals_latest_snapshot_in_store(run_builder, store_truth):
    root, run = run_builder.root, run_builder.run
    got = parse(Exporter(StoreSource(root, run)).exposition())
    truth = store_truth(root, run)
    snap = truth["snapshot"]
    assert len(snap) == run_builder.n_layers
    for name, col, _ in SNAPSHOT_GAUGES:
        expected = {lab(run=run, layer=l): float(r[col]) for l, r in snap.items()}
        assert series(got, name) == expected, name
    step = next(iter(snap.values()))["step"]
    assert series(got, "chrono_snapshot_step") == {lab(run=run): float(step)}
    assert series(got, "chrono_tokens_routed_total") == {
        lab(run=run, layer=l): float(n) for l, n in truth["tokens"].items()}


def test_alert_series_equal_the_store(run_builder, store_truth):
    root, run = run_builder.root, run_builder.run
    got = parse(Exporter(StoreSource(root, run)).exposition())
    truth = store_truth(root, run)
    assert truth["active"], "fixture should leave some alert active"
    expected_active = {lab(run=run, layer=l, alert=a): float((l, a) in truth["active"])
                       for l in range(run_builder.n_layers)
                       for a in ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED")}
    assert series(got, "chrono_alert_active") == expected_active
    assert series(got, "chrono_alert_transitions_total") == {
        lab(run=run, layer=l, alert=a, transition=t): float(n)
        for (l, a, t), n in truth["transitions"].items()}


def test_controller_series_equal_latest_decisions(run_builder, store_truth):
    root, run = run_builder.root, run_builder.run
    got = parse(Exporter(StoreSource(root, run)).exposition())
    decisions = store_truth(root, run)["decisions"]
    assert set(decisions) == {0, 1}
    for name, col, _ in DECISION_GAUGES:
        assert series(got, name) == {lab(run=run, layer=l, actuator="lens"): float(d[col])
                                     for l, d in decisions.items()}, name


def test_store_source_follows_new_windows(run_builder, store_truth):
    exporter = Exporter(StoreSource(run_builder.root, run_builder.run))
    before = parse(exporter.exposition())
    run_builder.add_windows(2)
    after = parse(exporter.exposition())
    truth = store_truth(run_builder.root, run_builder.run)
    step = next(iter(truth["snapshot"].values()))["step"]
    assert series(before, "chrono_snapshot_step") != series(after, "chrono_snapshot_step")
    assert series(after, "chrono_snapshot_step") == {lab(run=run_builder.run): float(step)}
    assert series(after, "chrono_neff") == {
        lab(run=run_builder.run, layer=l): r["neff"] for l, r in truth["snapshot"].items()}
    tok_before = series(before, "chrono_tokens_routed_total")
    tok_after = series(after, "chrono_tokens_routed_total")
    assert all(tok_after[k] > tok_before[k] for k in tok_before)


def test_store_source_rereads_only_after_a_change(run_builder, monkeypatch):
    import chrono.follow

    monkeypatch.setattr(chrono.follow, "FRESH_SECONDS", 0.0)  # trust directory mtimes at once
    src = StoreSource(run_builder.root, run_builder.run)
    (first,) = src.read()
    assert src.read()[0] is first  # nothing changed: the cached state is reused
    run_builder.add_windows(1)
    assert src.read()[0] is not first


def test_compaction_keeps_counters(run_builder):
    from chrono.store import compact

    exporter = Exporter(StoreSource(run_builder.root, run_builder.run))
    before = series(parse(exporter.exposition()), "chrono_tokens_routed_total")
    assert compact(run_builder.root, run_builder.run)
    after = series(parse(exporter.exposition()), "chrono_tokens_routed_total")
    assert after == before


def _age(root, run, seconds):
    """Make every stamp of ``run`` (manifest, table directories) ``seconds`` older."""
    import os

    from chrono.schema import TABLES
    from chrono.store import run_dir, table_dirs

    paths = [run_dir(root, run) / "manifest.json"]
    paths += [d for t in TABLES for d in table_dirs(root, t, run) if d.exists()]
    for p in paths:
        st = os.stat(p)
        os.utime(p, (st.st_atime, st.st_mtime - seconds))


def test_without_run_exports_every_recent_run(run_builder, store_truth):
    from tests.prometheus.conftest import RunBuilder

    other = RunBuilder(run_builder.root, run="exp2", n_layers=2, seed=1)
    other.add_windows(3)
    src = StoreSource(run_builder.root, recent_s=900)  # no run: every run written in the last 15 min
    exporter = Exporter(src)
    got = parse(exporter.exposition())
    assert {dict(k)["run"] for k in series(got, "chrono_neff")} == {"exp1", "exp2"}
    for run in ("exp1", "exp2"):  # each run's series equal that run's latest snapshot in the store
        truth = store_truth(run_builder.root, run)
        neff = {dict(k)["layer"]: v for k, v in series(got, "chrono_neff").items() if dict(k)["run"] == run}
        assert neff == {str(l): r["neff"] for l, r in truth["snapshot"].items()}
        active = {(int(dict(k)["layer"]), dict(k)["alert"])
                  for k, v in series(got, "chrono_alert_active").items() if dict(k)["run"] == run and v == 1}
        assert active == truth["active"]
    assert got[("chrono_exporter_runs", frozenset())] == 2.0
    assert got[("chrono_exporter_runs_left_out", frozenset())] == 0.0

    _age(run_builder.root, "exp1", 1000)  # quiet for longer than the window: it drops out
    got = parse(exporter.exposition())
    assert {dict(k)["run"] for k in series(got, "chrono_neff")} == {"exp2"}
    run_builder.add_windows(1)  # written again: back in
    got = parse(exporter.exposition())
    assert {dict(k)["run"] for k in series(got, "chrono_neff")} == {"exp1", "exp2"}
    assert src.current_runs() == ["exp1", "exp2"]  # newest first


def test_recent_runs_are_capped_newest_first(run_builder, caplog):
    from tests.prometheus.conftest import RunBuilder

    for i, run in enumerate(("a", "b", "c")):
        RunBuilder(run_builder.root, run=run, n_layers=1, seed=i).add_windows(1)
        _age(run_builder.root, run, 10 * (3 - i))  # c newest, then b, a
    _age(run_builder.root, "exp1", 100)
    src = StoreSource(run_builder.root, max_runs=2)
    got = parse(Exporter(src).exposition())
    assert {dict(k)["run"] for k in series(got, "chrono_neff")} == {"c", "b"}
    assert got[("chrono_exporter_runs_left_out", frozenset())] == 2.0
    assert "exporting the newest 2" in caplog.text


def test_pinned_run_is_exported_however_old(run_builder):
    _age(run_builder.root, "exp1", 10 * 86400)
    assert StoreSource(run_builder.root, recent_s=60).current_runs() == []
    got = parse(Exporter(StoreSource(run_builder.root, "exp1", recent_s=60)).exposition())
    assert {dict(k)["run"] for k in series(got, "chrono_neff")} == {"exp1"}


def test_bad_window_and_cap_are_clear_errors(store_root):
    with pytest.raises(ExporterError, match="window must be > 0"):
        StoreSource(store_root, recent_s=0)
    with pytest.raises(ExporterError, match="max_runs must be >= 1"):
        StoreSource(store_root, max_runs=0)


def test_expert_series_cap_counts_all_runs_together(run_builder):
    from tests.prometheus.conftest import RunBuilder

    RunBuilder(run_builder.root, run="exp2", n_layers=2, seed=1).add_windows(2)
    got = parse(Exporter(StoreSource(run_builder.root), expert_labels=True, max_expert_series=40).exposition())
    shares = series(got, "chrono_expert_share")
    assert len(shares) == 40  # 4x8 + 2x8 = 48 candidate series over both runs, capped at 40
    dropped = {dict(k)["run"]: v for k, v in series(got, "chrono_expert_share_series_dropped").items()}
    assert sum(dropped.values()) == 8


def test_unknown_run_and_root_are_clear_errors(store_root, tmp_path):
    from chrono.store import StoreError

    with pytest.raises(StoreError, match="unknown run 'nope'"):
        StoreSource(store_root, "nope")
    with pytest.raises(ExporterError, match="does not exist"):
        StoreSource(tmp_path / "missing")


def test_empty_root_exports_only_exporter_health(store_root):
    got = parse(Exporter(StoreSource(store_root)).exposition())
    assert {n for n, _ in got} == {"chrono_exporter_source_up", "chrono_exporter_read_errors_total",
                                   "chrono_exporter_runs", "chrono_exporter_runs_left_out"}
    assert got[("chrono_exporter_runs", frozenset())] == 0.0
    assert got[("chrono_exporter_source_up", frozenset())] == 1.0


# ------------------------------------------------------------------ live source
class FakeHandle:
    """The probes Handle methods the exporter reads (COMMON.md interface)."""

    def __init__(self, run_id="live1", n_layers=3, step=49):
        self.run_id = run_id
        self.n_layers, self.step_ = n_layers, step
        self.counts = {l: [100 * (l + 1), 50, 0, 10 * l] for l in range(n_layers)}

    def latest_snapshot(self):
        import numpy as np

        from chrono.snapshots import layer_rows

        return layer_rows(self.run_id, self.step_ - 49, self.step_,
                          {l: np.array(c) for l, c in self.counts.items()})

    def active_alerts(self):
        return {1: {"PRE_COLLAPSE"}, 2: {"PRE_COLLAPSE", "COLLAPSE_CONFIRMED"}}

    def alert_transitions(self):
        return {(1, "PRE_COLLAPSE", "raised"): 2, (1, "PRE_COLLAPSE", "cleared"): 1,
                (2, "COLLAPSE_CONFIRMED", "raised"): 1}

    def latest_decisions(self):
        return [{"step": self.step_ - 50, "layer": 0, "actuator": "lens", "debt": 0.1, "pressure": 0.1,
                 "heat": 0.1, "forgetting": 0.03, "lens_scale": 0.0, "backoff": 1.0, "abstain": True,
                 "reason": "old"},
                {"step": self.step_, "layer": 0, "actuator": "lens", "debt": 0.6, "pressure": 0.12,
                 "heat": 0.12, "forgetting": 0.032, "lens_scale": 0.02, "backoff": 0.5,
                 "abstain": False, "reason": ""}]

    def stats(self):
        return {"steps": self.step_ + 1, "tokens_total": {l: 1000 * (l + 1) for l in range(self.n_layers)},
                "hook_seconds": 0.125, "rows_written": {"routing": 640, "snapshots": 4},
                "write_errors": 2, "rows_dropped": 7, "nonfinite": 0}

    def latest_expert_counts(self):
        return self.counts


def test_live_exposition_equals_handle():
    h = FakeHandle()
    got = parse(Exporter(h).exposition())
    rows = {r["layer"]: r for r in h.latest_snapshot() if r["layer"] >= 0}
    for name, col, _ in SNAPSHOT_GAUGES:
        assert series(got, name) == {lab(run="live1", layer=l): float(r[col]) for l, r in rows.items()}
    assert "global" not in {dict(k).get("layer") for (n, k) in got}
    assert series(got, "chrono_tokens_routed_total") == {
        lab(run="live1", layer=l): 1000.0 * (l + 1) for l in range(3)}
    assert series(got, "chrono_alert_active") == {
        lab(run="live1", layer=l, alert=a): float(l == 2 or (l == 1 and a == "PRE_COLLAPSE"))
        for l in range(3) for a in ("PRE_COLLAPSE", "COLLAPSE_CONFIRMED")}
    assert series(got, "chrono_alert_transitions_total") == {
        lab(run="live1", layer=1, alert="PRE_COLLAPSE", transition="raised"): 2.0,
        lab(run="live1", layer=1, alert="PRE_COLLAPSE", transition="cleared"): 1.0,
        lab(run="live1", layer=2, alert="COLLAPSE_CONFIRMED", transition="raised"): 1.0}
    # only the newest decision of (layer 0, lens) is exported
    assert series(got, "chrono_controller_pressure") == {lab(run="live1", layer=0, actuator="lens"): 0.12}
    assert series(got, "chrono_lens_scale") == {lab(run="live1", layer=0, actuator="lens"): 0.02}
    assert series(got, "chrono_controller_abstaining") == {lab(run="live1", layer=0, actuator="lens"): 0.0}
    assert series(got, "chrono_probe_hook_seconds_total") == {lab(run="live1"): 0.125}
    assert series(got, "chrono_probe_steps_total") == {lab(run="live1"): 50.0}
    assert series(got, "chrono_store_write_errors_total") == {lab(run="live1"): 2.0}
    assert series(got, "chrono_store_rows_dropped_total") == {lab(run="live1"): 7.0}
    assert series(got, "chrono_store_rows_written_total") == {
        lab(run="live1", table="routing"): 640.0, lab(run="live1", table="snapshots"): 4.0}
    assert "chrono_expert_share" not in {n for n, _ in got}  # off by default


def test_live_snapshot_timestamp_moves_with_new_windows(monkeypatch):
    import types

    import chrono.exporters.sources as S

    clock = [1000.0]
    monkeypatch.setattr(S, "time", types.SimpleNamespace(time=lambda: clock[0]))
    h = FakeHandle()
    exporter = Exporter(h)
    assert series(parse(exporter.exposition()), "chrono_last_snapshot_timestamp_seconds") == {
        lab(run="live1"): 1000.0}
    clock[0] = 1010.0  # same window seen again: the timestamp stays
    assert series(parse(exporter.exposition()), "chrono_last_snapshot_timestamp_seconds") == {
        lab(run="live1"): 1000.0}
    h.step_ += 50  # a new window: the timestamp moves to when it was first seen
    clock[0] = 1020.0
    got = parse(exporter.exposition())
    assert series(got, "chrono_last_snapshot_timestamp_seconds") == {lab(run="live1"): 1020.0}
    assert series(got, "chrono_snapshot_step") == {lab(run="live1"): 99.0}


def test_expert_shares_only_when_asked_and_capped(caplog):
    h = FakeHandle(n_layers=3)  # 3 layers x 4 experts = 12 series
    got = parse(Exporter(h, expert_labels=True).exposition())
    shares = series(got, "chrono_expert_share")
    assert len(shares) == 12
    assert shares[lab(run="live1", layer=0, expert=0)] == 100 / 150
    assert shares[lab(run="live1", layer=1, expert=2)] == 0.0
    assert series(got, "chrono_expert_share_series_dropped") == {lab(run="live1"): 0.0}
    with caplog.at_level(logging.WARNING, logger="chrono.exporters.prometheus"):
        capped = parse(Exporter(h, expert_labels=True, max_expert_series=5).exposition())
    assert len(series(capped, "chrono_expert_share")) == 5
    assert series(capped, "chrono_expert_share_series_dropped") == {lab(run="live1"): 7.0}
    assert any("exceed the cap of 5" in r.message for r in caplog.records)


def test_expert_shares_from_store_are_latest_window(run_builder, store_truth):
    got = parse(Exporter(StoreSource(run_builder.root, run_builder.run), expert_labels=True).exposition())
    shares = series(got, "chrono_expert_share")
    assert len(shares) == run_builder.n_layers * run_builder.n_experts
    snap = store_truth(run_builder.root, run_builder.run)["snapshot"]
    for l, r in snap.items():
        layer_shares = [shares[lab(run=run_builder.run, layer=l, expert=e)]
                        for e in range(run_builder.n_experts)]
        assert sum(layer_shares) == pytest.approx(1.0)
        assert sum(1 for s in layer_shares if s == 0) == r["dead"]
        top2 = sum(sorted(layer_shares)[-2:])
        assert top2 == pytest.approx(r["top2_share"], rel=1e-12)


def test_broken_source_keeps_the_endpoint_up(caplog):
    class Broken(FakeHandle):
        def latest_snapshot(self):
            raise OSError("disk gone")

    exporter = Exporter(Broken())
    with caplog.at_level(logging.WARNING, logger="chrono.exporters.prometheus"):
        got = parse(exporter.exposition())
        got = parse(exporter.exposition())
    assert got[("chrono_exporter_source_up", frozenset())] == 0.0
    assert got[("chrono_exporter_read_errors_total", frozenset())] == 2.0
    assert sum("disk gone" in r.message for r in caplog.records) == 1  # logged once


def test_not_a_handle_is_a_clear_error():
    with pytest.raises(ExporterError, match="not a probes handle"):
        LiveSource(object())


# ------------------------------------------------------------------ HTTP serving
def fetch(url) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse(r.read())


def test_two_exporters_in_one_process_do_not_collide():
    with serve(FakeHandle("a", n_layers=2), port=0) as s1, serve(FakeHandle("b", n_layers=3), port=0) as s2:
        assert s1.port != s2.port and s1.host == s2.host == "127.0.0.1"
        assert s1.registry is not s2.registry
        a, b = fetch(s1.url), fetch(s2.url)
    assert {dict(k)["run"] for k in series(a, "chrono_neff")} == {"a"}
    assert {dict(k)["run"] for k in series(b, "chrono_neff")} == {"b"}
    assert len(series(a, "chrono_neff")) == 2 and len(series(b, "chrono_neff")) == 3
    # nothing leaked into the process-global registry
    assert not [m for m in REGISTRY.collect() if m.name.startswith("chrono_")]


def test_port_in_use_is_a_clear_error():
    with serve(FakeHandle(), port=0) as s:
        with pytest.raises(ExporterError, match="address already in use"):
            serve(FakeHandle(), port=s.port)


def test_close_frees_the_port():
    s = serve(FakeHandle(), port=0)
    port = s.port
    s.close()
    s.close()  # idempotent
    with serve(FakeHandle(), port=port) as again:
        assert fetch(again.url)[("chrono_exporter_source_up", frozenset())] == 1.0


def test_store_source_sees_a_part_renamed_in_within_the_same_mtime_tick(run_builder):
    """A new part that leaves the directory's mtime unchanged (same tick) is still exported."""
    import os

    from chrono.store import table_dir

    src = StoreSource(run_builder.root, run_builder.run)
    (first,) = src.read()
    dirs = [table_dir(run_builder.root, t, run_builder.run) for t in StoreSource._WATCHED]
    stamps = {d: os.stat(d) for d in dirs if d.is_dir()}
    run_builder.add_windows(1)
    for d, st in stamps.items():   # as if every rename had landed in the tick of the previous one
        os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    (after,) = src.read()
    assert after.snapshot_step == first.snapshot_step + 5
    assert sum(after.rows_stored.values()) > sum(first.rows_stored.values())


def test_heat_help_says_why_it_is_exported_next_to_pressure():
    """heat = clip(pressure, 0, 1) equals pressure under the ChronoMoE policy; its HELP says why both exist."""
    helps = {name: doc for name, _, doc in DECISION_GAUGES}
    assert "equals pressure" in helps["chrono_controller_heat"]
    assert "temperature actuator" in helps["chrono_controller_heat"]
