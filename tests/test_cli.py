"""The chrono CLI: commands, output formats, one-line errors with exit code 2."""
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from chrono_cli.main import main
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
    assert "routing 6,400" in out  # 200 steps x 4 layers x 8 experts
    assert "latest snapshot" in out


def test_show_is_a_compact_summary_and_json_is_the_raw_form(demo_root, capsys):
    from chrono.store import read_manifest, require_run

    assert run_cli("show", "demo", root=demo_root) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 25  # the raw manifest alone is ~35 lines
    assert "model    synthetic-drift, 4 layers x 8 experts, top-2, adapter synthetic" in out
    assert "created  20" in out and " UTC" in out  # a date, not a float epoch
    assert "health   COLLAPSE_CONFIRMED (layer " in out  # the demo ends collapsed
    assert '"schema_version"' not in out
    assert run_cli("show", "demo", "--json", root=demo_root) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["manifest"] == read_manifest(require_run(demo_root, "demo"))
    assert raw["rows"]["routing"] == 200 * 4 * 8
    assert raw["health"]["status"] == "COLLAPSE_CONFIRMED"


def test_runs_has_a_health_column(demo_root, tmp_path, capsys):
    import shutil

    import numpy as np

    import chrono

    root = tmp_path / "store"
    shutil.copytree(demo_root, root)
    with chrono.open_run(root, "calm") as w:
        w.log_routing(0, 0, np.full(8, 10))
    assert run_cli("runs", root=root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run_id", "health"]
    by_run = {l.split()[0]: l.split()[1] for l in lines[1:]}
    assert by_run == {"demo": "COLLAPSE_CONFIRMED", "calm": "OK"}


def test_plural_grammar(demo_root, capsys):
    from chrono_cli.common import plural

    assert [plural(n, "alert") for n in (0, 1, 2)] == ["0 alerts", "1 alert", "2 alerts"]
    assert run_cli("snapshot", "demo", "--every", "200", root=demo_root) == 0  # one window, 0 alerts
    out = capsys.readouterr().out
    assert "1 snapshot (every 200 steps), 5 rows, 0 alerts raised" in out
    assert run_cli("snapshot", "demo", "--every", "10", root=demo_root) == 0  # restore for other tests


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
    proc = subprocess.run([sys.executable, "-m", "chrono_cli", "--root", str(demo_root), *args],
                          capture_output=True, text=True, cwd=os.getcwd())
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chrono: error:"), proc.stderr
    assert needle in err[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in demo_root.rglob("*")) == before  # nothing changed on disk


@pytest.mark.parametrize("cmd", [["runs"], ["query", "SELECT 1"], ["alerts", "x"], ["show", "x"], ["replay", "x"],
                                 ["snapshot", "x"]])
def test_missing_root_says_the_store_does_not_exist(tmp_path, capsys, cmd):
    assert run_cli(*cmd, root=tmp_path / "nothing") == 2
    err = capsys.readouterr().err
    assert f"store {tmp_path / 'nothing'} does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nothing").exists()


def test_a_file_as_root_is_not_a_store(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert run_cli("runs", root=tmp_path / "f") == 2
    assert "is not a directory" in capsys.readouterr().err


def test_query_commands_do_not_import_torch(demo_root):
    code = ("import sys; from chrono_cli.main import main; main(['--root', sys.argv[1], 'runs']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(demo_root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "chrono_cli", "--help"], capture_output=True, text=True)
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


def test_demo_prints_stages_and_hints_that_run_in_the_users_shell(tmp_path):
    """After `make demo` (`.venv/bin/chrono demo`, venv not activated) every printed hint runs as printed."""
    import shlex

    entry = os.path.join(sys.prefix, "bin", "chrono")
    if not os.path.isfile(entry):
        pytest.skip("chrono is not installed as a console script in this environment")
    os.symlink(sys.prefix, tmp_path / ".venv")  # the layout `make demo` creates
    env = dict(os.environ, PATH="/usr/bin:/bin")  # the venv's bin is NOT on PATH, as after `make demo`
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    proc = subprocess.run([".venv/bin/chrono", "--root", "chrono_runs", "demo", "--steps", "20",
                           "--model-steps", "0", "--no-serve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.splitlines()[0].startswith("[1/1] recording synthetic run 'demo': 20 steps")
    assert "done in" in out
    assert "recording demo: 100%" in proc.stderr  # the tqdm bar, also when stderr is not a terminal
    hints = [l.strip() for l in out.split("look at it:")[1].splitlines()
             if l.strip().startswith(".venv/bin/chrono")]
    assert len(hints) == 5 and "source .venv/bin/activate" in out
    for hint in hints:
        if hint.endswith(" dashboard"):
            continue  # serves until Ctrl-C; the command exists if the others resolve
        r = subprocess.run(shlex.split(hint), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (hint, r.stderr)
        assert r.stdout.strip()
    fail = subprocess.run("chrono --root chrono_runs runs", shell=True, cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert fail.returncode == 127  # the bare form the demo used to print: command not found


def test_health_of_ranks_the_worst_layer_by_its_latest_snapshot():
    from chrono.health import health_of

    rows = [  # layer 2's alert fired at a lower Neff, but layer 3 is worse now
        {"run_id": "r", "layer": 2, "alert": "COLLAPSE_CONFIRMED", "neff": 1.30, "n_experts": 8,
         "neff_now": 1.25, "n_now": 8},
        {"run_id": "r", "layer": 3, "alert": "COLLAPSE_CONFIRMED", "neff": 1.35, "n_experts": 8,
         "neff_now": 1.10, "n_now": 8},
        {"run_id": "r", "layer": 1, "alert": "PRE_COLLAPSE", "neff": 1.0, "n_experts": 8,
         "neff_now": float("nan"), "n_now": float("nan")},
        {"run_id": "q", "layer": 0, "alert": "PRE_COLLAPSE", "neff": 3.0, "n_experts": 8,
         "neff_now": float("nan"), "n_now": None},  # no snapshot: the raising values decide
        {"run_id": "q", "layer": 5, "alert": "PRE_COLLAPSE", "neff": 2.0, "n_experts": 8},
    ]
    h = health_of(rows)
    assert h["r"].status == "COLLAPSE_CONFIRMED" and h["r"].worst_layer == 3
    assert h["r"].label() == "COLLAPSE_CONFIRMED (layer 3, 3 layers alerting)"
    assert h["q"].status == "PRE_COLLAPSE" and h["q"].worst_layer == 5
    assert health_of([]) == {}


def test_demo_serves_on_the_well_known_port_else_any_free_one(tmp_path):
    """`chrono demo` keeps 9108/8501 when free (bookmarks, scrape configs) and falls back to port 0."""
    import socket

    from chrono.exporters.prometheus import ExporterError
    from chrono.exporters.prometheus import serve as serve_metrics
    from chrono_cli.commands.demo import _default_else_any

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = _default_else_any(lambda port: serve_metrics(tmp_path, port=port), busy, ExporterError)
        try:
            assert server.port not in (busy, 0)
        finally:
            server.close()
    free = server.port   # just released: free again
    server = _default_else_any(lambda port: serve_metrics(tmp_path, port=port), free, ExporterError)
    try:
        assert server.port == free
    finally:
        server.close()
