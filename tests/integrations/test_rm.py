"""``chrono rm``: deletes a run everywhere, refuses unknown and live runs with one line (exit 2)."""
import os
import subprocess
import sys

import numpy as np

import chrono
from chrono_cli.main import main
from chrono.schema import TABLES
from chrono.store import list_runs


def _make_run(root, run, steps=3):
    with chrono.open_run(root, run, model={"name": "t"}) as w:
        for s in range(steps):
            w.log_routing(s, 0, np.array([3, 1, 0, 2]))
            w.log_signal(s, "loss", 1.0 / (s + 1))
        w.log_rows("alerts", [dict(step=2, layer=0, alert="PRE_COLLAPSE", transition="raised",
                                   consecutive=3, n_experts=4, token_count=6, neff=2.0,
                                   top2_share=0.8, dead=1)])


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def _run_files(root, run):
    return [f for f in _files(root) if f"run_id={run}" in f]


def test_rm_deletes_every_table_and_metadata_only_of_that_run(store_root, capsys):
    _make_run(store_root, "a")
    _make_run(store_root, "b")
    other = _run_files(store_root, "b")
    assert any(f.startswith("routing/") for f in _run_files(store_root, "a"))
    assert main(["--root", str(store_root), "rm", "a", "--yes"]) == 0
    assert "deleted run a" in capsys.readouterr().out
    assert _run_files(store_root, "a") == []
    for t in list(TABLES) + ["runs"]:
        assert not (store_root / t / "run_id=a").exists()
    assert list_runs(store_root) == ["b"]
    assert _run_files(store_root, "b") == other
    con = chrono.connect(store_root)
    assert con.execute("SELECT DISTINCT run_id FROM routing").fetchall() == [("b",)]


def test_rm_unknown_or_invalid_run_is_one_line_exit_2(store_root, capsys):
    _make_run(store_root, "a")
    before = _files(store_root)
    for run, needle in (("nope", "unknown run 'nope'"), ("../a", "invalid run id")):
        assert main(["--root", str(store_root), "rm", run, "--yes"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and err.startswith("chrono: error:")
    assert _files(store_root) == before


def test_rm_without_yes_and_without_terminal_refuses(store_root):
    _make_run(store_root, "a")
    before = _files(store_root)
    p = subprocess.run([sys.executable, "-m", "chrono_cli", "--root", str(store_root), "rm", "a"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "--yes" in p.stderr
    assert _files(store_root) == before


def test_rm_refuses_a_run_a_live_writer_holds(store_root):
    _make_run(store_root, "a")
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, chrono\n"
         "w = chrono.open_run(sys.argv[1], 'a')\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n"
         "w.close()\n", str(store_root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert writer.stdout.readline().strip() == "ready"
        before = _files(store_root)
        p = subprocess.run([sys.executable, "-m", "chrono_cli", "--root", str(store_root), "rm", "a",
                            "--yes"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert p.returncode == 2
        assert p.stderr.count("\n") == 1 and "being written" in p.stderr and "Traceback" not in p.stderr
        assert f"{writer.pid}@" in p.stderr    # names the holder
        assert _files(store_root) == before
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
    assert main(["--root", str(store_root), "rm", "a", "--yes"]) == 0   # the writer is gone
    assert list_runs(store_root) == []
