import json

import pyarrow as pa
import torch

import chrono
from chrono_cli.main import main
from chrono.governance import CONFIG_NAME, JSONL_NAME, govern
from chrono.store import run_dir


def _governed_run(store_root, tiny_model, fake_handle, run="gov1", steps=150):
    torch.manual_seed(1)
    model = tiny_model(n_layers=2, d=16, n_experts=4, skew=2.0)
    with chrono.open_run(store_root, run, model={"layers": [0, 1]}) as w:
        h = fake_handle(model, writer=w, run_id=run, flush_every=5)
        gov = govern(model, h, actuators=("lens", "bias"))
        shared = torch.randn(16)
        for _ in range(steps):
            h.observe(model(torch.randn(24, 16) * 0.5 + shared))
            h.step()
            gov.step()
        gov.remove()
    return h


def test_replay_reproduces_stored_decisions(store_root, tiny_model, fake_handle, capsys):
    h = _governed_run(store_root, tiny_model, fake_handle)
    assert len(h.decisions) == 60 and any(not d["abstain"] for d in h.decisions)
    meta = run_dir(store_root, "gov1")
    assert json.loads((meta / CONFIG_NAME).read_text())["actuator"] == "lens+bias"
    jsonl = [json.loads(l) for l in (meta / JSONL_NAME).read_text().splitlines()]
    assert [{k: r[k] for k in h.decisions[0]} for r in jsonl] == h.decisions   # JSONL mirrors the table
    assert {r["mode"] for r in jsonl} == {"faithful"} and jsonl[0]["informational"] == ["forgetting", "heat"]
    rc = main(["--root", str(store_root), "replay", "gov1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "reproduces all 60 decisions exactly" in out


def test_replay_detects_a_changed_decision(store_root, tiny_model, fake_handle, capsys):
    _governed_run(store_root, tiny_model, fake_handle, steps=60)
    con = chrono.connect(store_root)
    t = con.sql("SELECT * FROM decisions WHERE run_id = 'gov1'").to_arrow_table().to_pylist()
    t[3]["pressure"] += 1e-12                          # the smallest tampering must be caught
    with chrono.open_run(store_root, "gov1") as w:
        w.replace_table("decisions", pa.Table.from_pylist(t, schema=chrono.schema.DECISIONS))
    rc = main(["--root", str(store_root), "replay", "gov1"])
    out = capsys.readouterr().out
    assert rc == 1 and "pressure stored" in out and "replay DIFFERS: 1 differences" in out


def test_replay_user_errors(store_root, capsys):
    assert main(["--root", str(store_root), "replay", "missing"]) == 2
    with chrono.open_run(store_root, "empty"):
        pass
    assert main(["--root", str(store_root), "replay", "empty"]) == 2
    err = capsys.readouterr().err
    assert err.count("chrono: error:") == 2 and "Traceback" not in err
