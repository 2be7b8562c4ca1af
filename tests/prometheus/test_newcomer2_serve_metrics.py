"""newcomer2: serve-metrics options that did nothing, and a root that holds no store."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import chrono
from chrono_cli.main import main
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def test_recent_or_max_runs_with_run_is_one_line_exit_2(run_builder, capsys):
    # --recent and --max-runs pick which runs to export; with --run they were silently ignored
    for extra in (["--recent", "5m"], ["--max-runs", "3"]):
        assert main(["--root", str(run_builder.root), "serve-metrics", "--run", run_builder.run,
                     "--port", "0", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("chrono: error:") and extra[0] in err and "--run" in err
        assert err.count("\n") == 1


def test_serving_the_parent_of_a_store_says_where_the_store_is(tmp_path):
    # it served "(now: none)" with no hint that the runs live one directory down
    store = tmp_path / "store"
    with chrono.open_run(store, "r1", model={"layers": [0], "experts_per_layer": {"0": 2}}) as w:
        w.log_routing(0, 0, [1, 1])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "chrono_cli", "--root", str(tmp_path), "serve-metrics",
                             "--port", str(port)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()          # printed once the socket is bound
        assert "(now: none;" in banner, banner
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"chrono: note: no runs under {tmp_path}; it holds the store {store} (pass that as the root)" in err
