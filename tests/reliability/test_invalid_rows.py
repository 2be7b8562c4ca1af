"""Readers that meet rows the write API would refuse (an older version, another tool, a hand-edited
part): one line naming run, table, step and layer, never a traceback; exit 2 for the CLI."""
from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import chrono
from chrono_cli.main import main as cli_main
from chrono.schema import TABLES
from chrono.store import table_dir

RUN = "r"
STEPS = 12


def _clean(root, run=RUN):
    """A valid run: routing of 2 layers x 4 experts, snapshots + alerts, decisions, signals."""
    from chrono.snapshots import layer_rows

    with chrono.open_run(root, run, model={"layers": [0, 1], "experts_per_layer": {"0": 4, "1": 4}}) as w:
        rng = np.random.default_rng(0)
        for s in range(STEPS):
            w.log_routing(s, np.arange(2), rng.integers(0, 50, size=(2, 4)))
            w.log_signal(s, "loss", 3.0 - 0.1 * s)
        rows = layer_rows(run, 0, STEPS - 1, {0: np.array([9, 1, 1, 1]), 1: np.array([3, 3, 3, 3])})
        w.log_rows("snapshots", rows)
        w.log_rows("decisions", [dict(step=STEPS - 1, layer=0, actuator="lens", debt=0.1, pressure=0.02,
                                      heat=0.02, forgetting=0.022, lens_scale=0.0, backoff=1.0,
                                      abstain=True, reason="pressure < 0.01", neff=3.0, top2_share=0.6)])


def _plant(root, table, row, name="part-00009-00000000.parquet", nullable=False):
    """Write one row into ``table``'s partition as another tool would (exact column types)."""
    schema = TABLES[table]
    if nullable:   # a foreign writer that declares every column optional (so NULLs fit)
        schema = pa.schema([f.with_nullable(True) for f in schema])
    full = {f.name: row.get(f.name) for f in schema}
    full["run_id"] = RUN
    d = table_dir(root, table, RUN)
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([full], schema=schema), d / name)


ROUTING = dict(step=5, mode="TRAIN", layer=1, expert=2, tokens=-5, weight_sum=None, dropped=0, rank=0)
SNAP = dict(step=STEPS - 1, window_start=0, window_end=STEPS - 1, layer=1, n_experts=4, token_count=12,
            entropy=1.0, neff=float("nan"), top2_share=0.5, dead=0, nearly_dead=0, cv=0.0,
            max_violation=0.0, gini=0.0, jain=1.0, drop_fraction=0.0)
POISON = [   # (table, row, nullable, what the one line says, commands that stop on it)
    ("routing", ROUTING, False, "tokens = -5 (must be >= 0)", ["snapshot", "show"]),
    ("routing", dict(ROUTING, tokens=3, mode="WARMUP"), False, "mode = WARMUP", ["snapshot", "show"]),
    ("routing", dict(ROUTING, tokens=3, expert=-2), False, "expert = -2", ["snapshot", "show"]),
    ("routing", dict(ROUTING, tokens=3, step=-4), False, "step = -4", ["snapshot", "show"]),
    ("routing", dict(ROUTING, tokens=None), True, "tokens is NULL", ["snapshot", "show"]),
    ("routing", dict(ROUTING, tokens=2 ** 60), False, f"tokens = {2 ** 60} (must be <= {2 ** 53})",
     ["snapshot", "show"]),
    ("snapshots", SNAP, False, "neff = nan (must be finite)", ["alerts", "show", "replay"]),
    ("alerts", dict(step=3, layer=1, alert="MELTDOWN", transition="raised", consecutive=3, n_experts=4,
                    token_count=9, neff=1.0, top2_share=0.9, dead=2), False, "alert = MELTDOWN",
     ["alerts", "show"]),
    ("decisions", dict(step=STEPS - 1, layer=1, actuator="lens", debt=float("inf"), pressure=0.0, heat=0.0,
                       forgetting=0.02, lens_scale=0.0, backoff=1.0, abstain=True, reason="x"), False,
     "debt = inf", ["replay", "show"]),
    ("signals", dict(step=5, name="accuracy", layer=1, value=float("nan"), rank=0), False,
     "value of accuracy = nan", ["show"]),
    ("tokens", dict(step=5, mode="TRAIN", layer=1, batch_idx=0, position=-3, k=0, expert=1, rank=0), False,
     "position = -3", ["show"]),
    ("lifecycle", dict(step=5, layer=1, event="explode", expert=0, n_experts_after=4, applied=True,
                       reason=""), False, "event = explode", ["show"]),
]


@pytest.mark.parametrize("table,row,nullable,what,commands", POISON,
                         ids=[f"{p[0]}-{p[3][:20]}" for p in POISON])
def test_cli_stops_with_one_line_naming_run_table_step_layer(tmp_path, capsys, table, row, nullable,
                                                              what, commands):
    _clean(tmp_path)
    (tmp_path / "runs" / f"run_id={RUN}" / "control_config.json").write_text("{}")
    _plant(tmp_path, table, row, nullable=nullable)
    for cmd in commands:
        capsys.readouterr()
        argv = ["--root", str(tmp_path), cmd, RUN] + (["--every", "4"] if cmd == "snapshot" else [])
        assert cli_main(argv) == 2, cmd
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (cmd, err)
        assert f"run '{RUN}', table {table}, step {row['step']}, layer {row['layer']}: {what}" in err, (cmd, err)


def test_snapshot_skip_invalid_equals_the_run_without_the_bad_rows(tmp_path, capsys):
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    _clean(clean)
    _clean(dirty)
    _plant(dirty, "routing", ROUTING)
    _plant(dirty, "routing", dict(ROUTING, tokens=7, mode="??"), name="part-00009-00000001.parquet")
    assert cli_main(["--root", str(clean), "snapshot", RUN, "--every", "4"]) == 0
    capsys.readouterr()
    assert cli_main(["--root", str(dirty), "snapshot", RUN, "--every", "4", "--skip-invalid"]) == 0
    err = capsys.readouterr().err
    assert "skipping 2 invalid routing rows; first: step 5, layer 1: tokens = -5" in err
    q = "SELECT * EXCLUDE (run_id) FROM snapshots ORDER BY step, layer"
    assert chrono.connect(dirty).execute(q).fetchall() == chrono.connect(clean).execute(q).fetchall()


def test_connect_skip_invalid_moves_bad_rows_to_invalid_views(tmp_path):
    _clean(tmp_path)
    _plant(tmp_path, "routing", ROUTING)
    raw = chrono.connect(tmp_path)
    assert raw.execute("SELECT count(*) FROM routing").fetchone()[0] == STEPS * 8 + 1
    con = chrono.connect(tmp_path, skip_invalid=True)
    assert con.execute("SELECT count(*) FROM routing").fetchone()[0] == STEPS * 8
    assert con.execute("SELECT step, layer, tokens FROM invalid_routing").fetchall() == [(5, 1, -5)]
    chrono.refresh(con)   # the option survives a refresh
    assert con.execute("SELECT count(*) FROM invalid_routing").fetchone()[0] == 1


def test_exporter_leaves_invalid_rows_out_with_one_line(tmp_path, caplog):
    from chrono.exporters.prometheus import Exporter, StoreSource

    _clean(tmp_path)
    truth = chrono.connect(tmp_path).execute(
        "SELECT layer, sum(tokens) FROM routing GROUP BY layer ORDER BY layer").fetchall()
    _plant(tmp_path, "routing", ROUTING)
    _plant(tmp_path, "snapshots", dict(SNAP, neff=2.5, layer=0, step=STEPS + 50, window_end=STEPS + 50,
                                       n_experts=-4))
    with caplog.at_level(logging.WARNING, logger="chrono.exporters.prometheus"):
        src = StoreSource(tmp_path, run=RUN)
        (state,) = src.read(want_shares=True)           # one pinned run
        text = Exporter(src).exposition().decode()
    assert sorted(state.tokens_routed.items()) == truth          # the -5 row is not summed in
    assert state.snapshot_step == STEPS - 1                     # the bad newer snapshot is left out
    assert "chrono_exporter_source_up 1.0" in text
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"run '{RUN}', table routing, step 5, layer 1: tokens = -5" in m for m in lines), lines
    assert any("table snapshots" in m and "n_experts = -4" in m for m in lines), lines


def test_dashboard_pages_warn_in_one_line_and_skip_bad_rows(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from pathlib import Path

    _clean(tmp_path)
    _plant(tmp_path, "routing", ROUTING)
    monkeypatch.setenv("CHRONO_ROOT", str(tmp_path))
    app = str(Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=60)
    at.query_params["run"] = RUN
    at.run()
    for page in ("routing", "health", "alerts", "lifecycle", "governance"):
        at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, (page, [e.value for e in at.exception])
        warnings = [w.value for w in at.warning]
        assert any(f"run '{RUN}', table routing, step 5, layer 1: tokens = -5" in w for w in warnings), page
    at.switch_page("views/routing.py")
    at.run()
    tokens = {m.label: m.value for m in at.metric}["Token assignments"]
    truth = chrono.connect(tmp_path).execute("SELECT sum(tokens) FROM routing WHERE tokens >= 0").fetchone()[0]
    assert tokens == f"{truth:,}"
