"""A newcomer's walk through the README and docs: what they say, checked as written (CLI side).

Each test is a fault found by following the docs; ground truth is written out in the test.
"""
import json

import numpy as np
import pytest

import chrono
from chrono_cli.main import main


def _calm_run(root):
    """One run whose routing is perfectly even: no alert can ever be raised."""
    with chrono.open_run(root, "calm", model={"layers": [0], "experts_per_layer": {"0": 8}, "top_k": 2}) as w:
        for step in range(30):
            w.log_routing(step, layer=0, counts=np.full(8, 10))
    assert main(["--root", str(root), "snapshot", "calm", "--every", "10"]) == 0


def test_show_json_gives_a_healthy_run_an_ok_status(tmp_path, capsys):
    # README: `chrono show RUN --json`: "the raw manifest, row counts and health"; the text form
    # says "health   OK (no active alert)". The JSON form gave null for a healthy run, so a script
    # reading .health.status could not tell "healthy" from "no health computed".
    _calm_run(tmp_path)
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "show", "calm"]) == 0
    assert "health   OK" in capsys.readouterr().out
    assert main(["--root", str(tmp_path), "show", "calm", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["rows"]["snapshots"] == 3 * 2   # 3 windows x (layer 0 + the global row)
    assert raw["health"] == {"status": "OK", "worst_layer": None, "active": []}


def _store_files(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}




@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "table"])
def test_query_output_never_overwrites_the_store(tmp_path, capsys, fmt):
    # `chrono query SQL --output F` wrote F wherever it pointed: --output at a part file
    # replaced the run's routing rows by the query result, at manifest.json the run's manifest
    # (data lost for good). Any path inside the store is now refused, with one line and exit 2,
    # the store unchanged; the same path through a symlink from outside too.
    root = tmp_path / "store"
    _calm_run(root)
    part = next((root / "routing" / "run_id=calm").glob("*.parquet"))
    manifest = root / "runs" / "run_id=calm" / "manifest.json"
    link = tmp_path / "out.file"
    link.symlink_to(part)
    before = _store_files(root)
    capsys.readouterr()
    for target in (part, manifest, root / "result.out", link):
        assert main(["--root", str(root), "query", "SELECT 1 AS x", "--format", fmt,
                     "--output", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("chrono: error: ") and "inside the store" in err[0], err
    assert _store_files(root) == before
    # a file outside the store is still written
    assert main(["--root", str(root), "query", "SELECT 1 AS x", "--format", fmt,
                 "--output", str(tmp_path / "ok.out")]) == 0
    assert (tmp_path / "ok.out").stat().st_size > 0


def test_recomputed_snapshots_end_at_the_runs_last_step(tmp_path, capsys):
    # `chrono snapshot RUN --every K` labelled the last, partial window with its planned end:
    # a run of steps 0..23 got a snapshot at step 29 (window_end 29), a 4-step generation run
    # recomputed with --every 50 one at step 49, steps the run never reached (chrono show,
    # the dashboard and the TensorBoard export then put them there). The probes' own last
    # window ends at the last step; the recomputed one must too.
    with chrono.open_run(tmp_path, "short", model={"layers": [0, 1], "experts_per_layer": {"0": 4, "1": 4},
                                                   "top_k": 1}) as w:
        for step in range(24):
            for layer in (0, 1):
                w.log_routing(step, layer=layer, counts=[70, 10, 10, 10])
    assert main(["--root", str(tmp_path), "snapshot", "short", "--every", "10"]) == 0
    con = chrono.connect(tmp_path)
    got = con.execute("SELECT DISTINCT step, window_start, window_end FROM snapshots ORDER BY ALL").fetchall()
    assert got == [(9, 0, 9), (19, 10, 19), (23, 20, 23)]
    # the partial window's metrics are those of its 4 steps x 100 tokens
    assert con.execute("SELECT token_count FROM snapshots WHERE step = 23 AND layer = 0").fetchall() == [(400,)]
    # Top2 0.8 > 0.75 for 3 windows: PRE_COLLAPSE raised at the third, at the run's last step
    assert con.execute("SELECT DISTINCT step, alert FROM alerts WHERE transition = 'raised'").fetchall() == [
        (23, "PRE_COLLAPSE")]


def test_query_csv_writes_list_struct_map_and_interval_columns(tmp_path, capsys):
    # `chrono query "SELECT layer, list(expert ...) ..." --format csv` ended in a pyarrow
    # traceback (ArrowInvalid: Unsupported Type: list<...>, exit 1): pyarrow's CSV writer has
    # no nested or interval types. Their cells now hold the JSON that --format json writes.
    import csv
    import io

    _calm_run(tmp_path)
    capsys.readouterr()
    sql = ("SELECT layer, list(DISTINCT expert ORDER BY expert) AS experts, {'n': count(*)} AS s, "
           "map([1], [2]) AS m, INTERVAL 1 DAY AS i, [{'a': 1}] AS ls "
           "FROM routing WHERE run_id = 'calm' GROUP BY layer")
    assert main(["--root", str(tmp_path), "query", sql, "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    (row,) = list(csv.DictReader(io.StringIO(captured.out)))
    assert main(["--root", str(tmp_path), "query", sql, "--format", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert row["layer"] == "0"
    assert json.loads(row["experts"]) == as_json["experts"] == list(range(8))
    assert json.loads(row["s"]) == as_json["s"] == {"n": 30 * 8}
    for col in ("m", "i", "ls"):
        assert json.loads(row[col]) == as_json[col]


@pytest.mark.parametrize("expr", ["INTERVAL 1 DAY", "union_value(k := 1)"])
def test_query_parquet_of_a_type_parquet_lacks_is_one_line(tmp_path, capsys, expr):
    # --format parquet of an interval or union column ended in a pyarrow traceback (exit 1);
    _calm_run(tmp_path / "store")
    capsys.readouterr()
    # pyarrow also deleted a file already at --output when the write failed: it must stay as it was
    out, kept = tmp_path / "out.parquet", tmp_path / "kept.parquet"
    kept.write_bytes(b"the user's earlier result")
    for target in (out, kept):
        assert main(["--root", str(tmp_path / "store"), "query", f"SELECT {expr} AS v", "--format", "parquet",
                     "--output", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("chrono: error: ") and "Parquet" in err[0], err
    assert not out.exists()
    assert kept.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.parquet", "store"]


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_every_command_takes_root_after_its_name(tmp_path, capsys, monkeypatch):
    # README, CLI reference: "All commands take --root DIR". Only dashboard, migrate and astarte
    # took it after the command name; `chrono runs --root DIR` (as `chrono dashboard --root DIR`
    # in docs/dashboard.md) was "unrecognized arguments", exit 2. Both places work now, and
    # the one after the command wins over the one before (the nearer one).
    from chrono_cli.main import build_parser

    missing = [name for name, sub in _subparsers(build_parser()) if "--root" not in sub._option_string_actions]
    assert missing == []
    _calm_run(tmp_path / "store")
    monkeypatch.chdir(tmp_path)   # ./chrono_runs (the default) does not exist here
    capsys.readouterr()
    store = str(tmp_path / "store")
    for argv in (["runs"], ["show", "calm"], ["alerts", "calm"], ["query", "SELECT count(*) AS n FROM routing"],
                 ["analyze", "calm", "loads"], ["snapshot", "calm", "--every", "10"]):
        assert main(argv + ["--root", store]) == 0, argv
        assert main(["--root", str(tmp_path / "nowhere")] + argv + ["--root", store]) == 0, argv
    assert main(["export", "tensorboard", "calm", "--logdir", str(tmp_path / "tb"), "--root", store]) == 0
    assert main(["runs"]) == 2   # without it: the default ./chrono_runs, which does not exist
    assert "does not exist" in capsys.readouterr().err
