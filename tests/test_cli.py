"""The chrono CLI: commands, output formats, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from chrono.cli import main
from chrono.store import run_dir


def run_cli(*args, root=None):
    argv = (["--root", str(root)] if root is not None else []) + list(args)
    return main(argv)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["--root", str(root), "demo", "--steps", "200", "--model-steps", "0", "--no-serve"]) == 0
    return root


def test_demo_then_alerts_shows_pre_before_confirmed(demo_root, capsys):
    assert run_cli("alerts", "demo", root=demo_root) == 0
    out = capsys.readouterr().out
    lines = [l.split() for l in out.splitlines()[1:] if l.strip()]
    pre = [int(l[0]) for l in lines if l[2] == "PRE_COLLAPSE" and l[3] == "raised"]
    confirmed = [int(l[0]) for l in lines if l[2] == "COLLAPSE_CONFIRMED" and l[3] == "raised"]
    assert pre and confirmed
    assert min(pre) < min(confirmed)


def test_runs_and_show(demo_root, capsys):
    assert run_cli("runs", root=demo_root) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "synthetic" in out
    assert run_cli("show", "demo", root=demo_root) == 0
    out = capsys.readouterr().out
    assert "routing    6400" in out  # 200 steps x 4 layers x 8 experts
    assert "latest snapshot" in out


def test_query_formats(demo_root, tmp_path, capsys):
    sql = "SELECT layer, sum(tokens) AS t FROM routing GROUP BY layer ORDER BY layer"
    assert run_cli("query", sql, "--format", "csv", root=demo_root) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0].replace('"', "") == "layer,t"
    assert len(csv) == 5 and csv[1].startswith("0,")
    assert run_cli("query", sql, "--format", "json", root=demo_root) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    assert all(r["t"] == 200 * 2048 * 2 for r in rows)  # every step routes 2048 tokens x top-2
    out = tmp_path / "q.parquet"
    assert run_cli("query", sql, "--format", "parquet", "--output", str(out), root=demo_root) == 0
    assert pq.read_table(out).num_rows == 4


def test_snapshot_recompute_replaces_previous(demo_root, capsys):
    assert run_cli("snapshot", "demo", "--every", "20", root=demo_root) == 0
    assert "10 snapshots" in capsys.readouterr().out
    assert run_cli("snapshot", "demo", "--every", "20", root=demo_root) == 0
    capsys.readouterr()
    assert run_cli("query", "SELECT count(*) AS n FROM snapshots", "--format", "json", root=demo_root) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 10 * 5  # not doubled


def test_compact(demo_root, capsys):
    assert run_cli("compact", "demo", root=demo_root) == 0
    assert "routing: merged" in capsys.readouterr().out
    assert run_cli("query", "SELECT count(*) AS n FROM routing", "--format", "json", root=demo_root) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 6400


@pytest.mark.parametrize("args,needle", [
    (["show", "nope"], "unknown run 'nope'"),
    (["show", "../etc"], "invalid run id"),
    (["alerts", "a/b"], "invalid run id"),
    (["query", "SELEC oops"], "syntax error"),
    (["query", "DROP VIEW routing"], "only read-only"),
    (["query", "COPY (SELECT 1) TO 'out.csv'"], "only read-only"),
    (["query", "SELECT * FROM read_csv('/etc/passwd')"], "ermission"),
    (["query", "SELECT 1", "--format", "parquet"], "needs --output"),
    (["snapshot", "demo", "--every", "0"], "--every must be >= 1"),
    (["snapshot", "demo", "--every", "x"], "invalid int value"),
    (["--bogus"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
])
def test_user_mistakes_are_one_line_exit_2(demo_root, args, needle):
    before = sorted(p.name for p in demo_root.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "chrono.cli", "--root", str(demo_root), *args],
                          capture_output=True, text=True, cwd=os.getcwd())
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chrono: error:"), proc.stderr
    assert needle in err[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in demo_root.rglob("*")) == before  # nothing changed on disk


def test_missing_root_is_an_empty_store(tmp_path, capsys):
    assert run_cli("runs", root=tmp_path / "nothing") == 0
    assert "(no rows)" in capsys.readouterr().out
    assert not (tmp_path / "nothing").exists()


def test_query_commands_do_not_import_torch(demo_root):
    code = ("import sys; from chrono.cli import main; main(['--root', sys.argv[1], 'runs']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "chrono.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("runs", "show", "query", "snapshot", "alerts", "compact", "demo"):
        assert cmd in proc.stdout


def test_demo_trains_a_governed_hf_mixtral(tmp_path, capsys):
    """The demo's real-model run: probes find both routers, counts land, the controller decides."""
    assert main(["--root", str(tmp_path), "demo", "--steps", "20", "--model-steps", "20", "--no-serve"]) == 0
    out = capsys.readouterr().out
    assert "2 routers found by probes" in out
    import chrono

    con = chrono.connect(tmp_path)
    ((layers, tokens),) = con.execute(
        "SELECT count(DISTINCT layer), sum(tokens) FROM routing WHERE run_id = 'demo-mixtral'").fetchall()
    assert layers == 2
    assert tokens == 20 * 8 * 64 * 2 * 2  # steps x batch x seq x top-2 x layers
    ((decisions,),) = con.execute("SELECT count(*) FROM decisions WHERE run_id = 'demo-mixtral'").fetchall()
    assert decisions == 2 * 2  # 2 snapshot windows x 2 layers
    assert con.execute("SELECT count(*) FROM signals WHERE run_id = 'demo-mixtral' AND name = 'loss'"
                       ).fetchall() == [(20,)]


def test_demo_twice_is_idempotent_and_spares_user_runs(tmp_path, capsys):
    for _ in range(2):
        assert main(["--root", str(tmp_path), "demo", "--steps", "20", "--model-steps", "0", "--no-serve"]) == 0
    import chrono

    con = chrono.connect(tmp_path)
    assert con.execute("SELECT count(*) FROM routing WHERE run_id = 'demo'").fetchall() == [(20 * 4 * 8,)]
    with chrono.open_run(tmp_path, "mine") as w:  # a user's run is never removed by the demo
        w.log_signal(0, "loss", 1.0)
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "demo", "--run", "mine", "--steps", "20", "--model-steps", "0",
                 "--no-serve"]) == 2
    assert "was not written by 'chrono demo'" in capsys.readouterr().err
    assert (run_dir(tmp_path, "mine") / "manifest.json").exists()
    assert chrono.connect(tmp_path).execute("SELECT count(*) FROM signals WHERE run_id = 'mine'").fetchall() == [(1,)]
