"""chrono.govern on a real probes Handle: decisions in the store, in the JSONL, and replayable."""
import json

import pytest
import torch

import chrono
import chrono.actuators
from chrono_cli.main import main
from chrono.governance import JSONL_NAME
from chrono.store import list_runs, run_dir

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


# ------------------------------------------------ issue 20 item 13: failed set-up leaves nothing
def _hook_counts(model):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def _run_paths(root, run):
    return [p for p in root.rglob("*") if f"run_id={run}" in p.name or p.name == run]


def _without_bias(model, layers):
    for i in layers:
        r = model.layers[i]["router"]
        del r.selection_bias             # no bias tensor: a router the bias actuator cannot steer
        r.selection_bias = 0.0           # (its forward still adds a plain 0.0)
    return model


@pytest.mark.parametrize("actuators", [("bias",), ("informed-lens", "bias"), ("no-such-actuator",)])
def test_failed_govern_leaves_no_run_and_no_hooks(store_root, tiny_model, actuators):
    model = _without_bias(tiny_model(n_layers=2, d=16, n_experts=4), [0, 1])
    clean = _hook_counts(model)
    with pytest.raises(chrono.actuators.ActuatorError):
        with probes.attach(model, run="bad", root=store_root, flush_every=5) as h:
            chrono.govern(model, h, actuators=actuators)
    assert "bad" not in list_runs(store_root) and _run_paths(store_root, "bad") == []
    assert _hook_counts(model) == clean


def test_failure_on_a_later_layer_removes_the_earlier_layers_actuators(store_root, tiny_model):
    model = _without_bias(tiny_model(n_layers=2, d=16, n_experts=4), [1])   # layer 0 can, layer 1 cannot
    with probes.attach(model, run="half", root=store_root, flush_every=5) as h:
        model(torch.randn(8, 16))
        h.step()                                                 # the run has data: the handle stays
        probes_only = _hook_counts(model)
        with pytest.raises(chrono.actuators.ActuatorError, match="bias"):
            chrono.govern(model, h, actuators=("bias",))
        assert _hook_counts(model) == probes_only                # layer 0's bias hooks are gone too
        assert sum(probes_only) > 0
    assert _hook_counts(model) == [0] * len(probes_only)


def test_failed_govern_keeps_a_run_that_already_has_data(store_root, tiny_model):
    model = _without_bias(tiny_model(n_layers=2, d=16, n_experts=4), [0, 1])
    with probes.attach(model, run="kept", root=store_root, flush_every=5) as h:
        for _ in range(10):
            model(torch.randn(8, 16))
            h.step()
        with pytest.raises(chrono.actuators.ActuatorError):
            chrono.govern(model, h, actuators=("bias",))
        model(torch.randn(8, 16))                                # training goes on, telemetry too
        h.step()
    assert "kept" in list_runs(store_root)
    ((steps,),) = chrono.connect(store_root).execute(
        "SELECT count(DISTINCT step) FROM routing WHERE run_id = 'kept'").fetchall()
    assert steps == 11
