"""``chrono serve-metrics``: one-line errors, and a real process serving a run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from chrono_cli.main import main
from chrono.exporters.prometheus import serve
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def test_unknown_run_is_one_line_exit_2(run_builder, capsys):
    assert main(["--root", str(run_builder.root), "serve-metrics", "--run", "nope", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chrono: error: unknown run 'nope'") and err.count("\n") == 1


def test_missing_root_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--root", str(tmp_path / "none"), "serve-metrics"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_port_in_use_is_one_line_exit_2(run_builder, capsys):
    with serve(str(run_builder.root), port=0) as busy:
        code = main(["--root", str(run_builder.root), "serve-metrics", "--port", str(busy.port)])
    assert code == 2
    assert "address already in use" in capsys.readouterr().err


def test_serve_metrics_process_serves_the_run_and_stops_on_sigterm(run_builder):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "chrono_cli", "--root", str(run_builder.root), "serve-metrics",
         "--run", run_builder.run, "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline()  # printed once the socket is bound
        assert f"http://127.0.0.1:{port}/metrics" in banner, (banner, proc.stderr.read() if proc.poll() else "")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        neff = {s.labels["layer"] for s in fams["chrono_neff"].samples}
        assert neff == {str(l) for l in range(run_builder.n_layers)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
