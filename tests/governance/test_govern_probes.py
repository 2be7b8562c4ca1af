"""chrono.govern on a real probes Handle: decisions in the store, in the JSONL, and replayable."""
import json

import pytest
import torch

import chrono
from chrono.cli import main
from chrono.governance import JSONL_NAME
from chrono.store import run_dir

probes = pytest.importorskip("probes")


def test_govern_with_probes_end_to_end(store_root, tiny_model, capsys):
    torch.manual_seed(0)
    model = tiny_model(n_layers=2, d=16, n_experts=4, skew=2.0)
    shared = torch.randn(16)
    with probes.attach(model, run="govp", root=store_root, flush_every=5) as h:
        assert sorted(s.layer for s in h.routers) == [0, 1]
        gov = chrono.govern(model, h, actuators=("informed-lens", "bias"))
        for _ in range(120):
            model(torch.randn(32, 16) * 0.5 + shared)
            h.step()
            gov.step()
        latest = h.latest_decisions()
        gov.remove()
    assert [d["layer"] for d in latest] == [0, 1]
    con = chrono.connect(store_root)
    rows = con.sql("SELECT * FROM decisions WHERE run_id = 'govp' ORDER BY step, layer").to_arrow_table().to_pylist()
    ((windows,),) = con.execute("SELECT count(DISTINCT step) FROM snapshots WHERE run_id = 'govp'").fetchall()
    assert windows >= 24 and len(rows) == 2 * windows   # one decision per layer per snapshot window
    assert {r["actuator"] for r in rows} == {"informed-lens+bias"}
    assert any(not r["abstain"] for r in rows)
    jsonl = [json.loads(l) for l in (run_dir(store_root, "govp") / JSONL_NAME).read_text().splitlines()]
    assert [(r["step"], r["layer"], r["pressure"]) for r in jsonl] == \
        [(r["step"], r["layer"], r["pressure"]) for r in rows]
    assert main(["--root", str(store_root), "replay", "govp"]) == 0
    assert f"reproduces all {2 * windows} decisions exactly" in capsys.readouterr().out
