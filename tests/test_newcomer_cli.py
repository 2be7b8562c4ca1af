"""A newcomer's walk through the README and docs: what they say, checked as written (CLI side).

Each test is a fault found by following the docs; ground truth is written out in the test.
"""
import json

import numpy as np

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
