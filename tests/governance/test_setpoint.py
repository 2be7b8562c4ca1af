"""The setpoint mode: PI arithmetic, anti-windup, per-layer targets, a closed loop, replay."""
import json

import numpy as np
import pytest
import torch

import chrono
from chrono_cli.main import main
from chrono.controller import ControlConfig, Controller, informational, setpoint
from chrono.governance import JSONL_NAME, govern
from chrono.snapshots import layer_rows
from chrono.store import run_dir


def test_pi_step_numbers():
    # below target, unsaturated: I += ki·e, u = kp·e + I  (hand-computed)
    assert setpoint.pi_step(0.3, 0.05, kp=2.0, ki=0.2) == pytest.approx((0.31, 0.41))
    # above target: the integral unwinds, the effort is clipped at 0
    assert setpoint.pi_step(0.3, -0.2, kp=2.0, ki=0.2) == pytest.approx((0.26, 0.0))
    # saturated high with positive error: no integration (anti-windup)
    assert setpoint.pi_step(0.0, 0.6, kp=2.0, ki=0.2) == (0.0, 1.0)
    # the integral never leaves [0, integral_max]
    assert setpoint.pi_step(0.95, 0.4, kp=0.0, ki=0.5, integral_max=1.0) == (1.0, 1.0)
    assert setpoint.pi_step(0.01, -0.5, kp=0.0, ki=0.2) == (0.0, 0.0)
    assert setpoint.error(3.2, 6.4) == 0.5 and setpoint.target(0.8, 8) == pytest.approx(6.4)


def test_anti_windup_effort_drops_as_soon_as_the_error_turns():
    """A long saturated stretch must not leave a wound-up integral behind."""
    integral = 0.0
    for _ in range(50):                       # far below target for 50 windows
        integral, u = setpoint.pi_step(integral, 0.7)
        assert u == 1.0
    assert integral == 0.0                    # saturated the whole time: nothing accumulated
    integral, u = setpoint.pi_step(integral, -0.05)   # just above target
    assert u == 0.0
    naive = 50 * 0.2 * 0.7                    # what an integrator without anti-windup would hold
    assert naive > 1.0                        # ... and would have kept pushing with u = 1


def _rows(step, neffs_counts):
    return layer_rows("r", step - 9, step, neffs_counts)


def test_setpoint_decisions_per_layer_targets_and_informational():
    cfg = ControlConfig(actuator="aux", mode="setpoint", neff_target={0: 0.8, 1: 0.5})
    ctl = Controller(2, 4, cfg)
    # layer 0 at shares [.7,.1,.1,.1] (Neff ~2.56 < 3.2), layer 1 the same (> 0.5·4 = 2)
    c = np.array([700, 100, 100, 100])
    d0, d1 = ctl.update(_rows(9, {0: c, 1: c}))
    assert d0.mode == d1.mode == "setpoint"
    assert d0.target == pytest.approx(3.2) and d1.target == pytest.approx(2.0)
    assert d0.error == pytest.approx((3.2 - d0.neff) / 3.2) and d0.error > 0 and d1.error < 0
    assert d0.effort > 0 and not d0.abstain and d0.pressure == d0.effort and d0.heat == d0.effort
    assert d1.effort == 0.0 and d1.abstain and "at or above" in d1.reason
    assert d0.lens_scale == pytest.approx(d0.effort * 0.02)       # warm-up cap on the lens scale
    assert d0.informational == ("backoff", "debt", "forgetting", "heat", "lens_scale")
    row = d0.as_row("run")
    assert set(row) == {f.name for f in chrono.schema.DECISIONS}  # table row: table columns only
    rec = d0.as_record()
    assert rec["integral"] == d0.integral and rec["informational"][0] == "backoff"


def test_informational_follows_the_attached_actuators():
    assert informational("faithful", "lens") == ("forgetting", "heat")
    assert informational("faithful", "temperature+lens") == ("forgetting",)
    assert "heat" not in informational("setpoint", "temperature")
    assert informational("setpoint", "lens+bias+aux+temperature") == ("backoff", "debt", "forgetting")


def test_config_validation_and_json_roundtrip():
    c = ControlConfig(mode="setpoint", neff_target={0: 0.9, 3: 0.7}, kp=1.5)
    assert ControlConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for bad in ({"mode": "pid"}, {"neff_target": 0.0}, {"neff_target": {0: 1.5}}, {"kp": -1.0}):
        with pytest.raises(ValueError):
            ControlConfig(**bad)
    assert ControlConfig.from_dict({"actuator": "lens"}).mode == "faithful"   # old configs replay as before


def test_closed_loop_bias_regulates_to_the_set_point(tiny_model, fake_handle):
    """Skewed routing (one expert wins); setpoint control of the bias rate brings every layer to the
    target, then the effort falls back (it spends balancing only while routing needs it)."""
    torch.manual_seed(0)
    model = tiny_model(n_layers=2, d=16, n_experts=4, skew=3.0)
    h = fake_handle(model, flush_every=5)
    cfg = ControlConfig(mode="setpoint", neff_target=0.8)
    gov = govern(model, h, actuators=("bias",), config=cfg, actuator_kwargs={"bias": {"rate": 0.05}})
    shared = torch.randn(16)
    for _ in range(400):
        h.observe(model(torch.randn(64, 16) * 0.3 + shared))
        h.step()
        gov.step()
    d = h.decisions
    first = [r for r in d if r["step"] == 4]
    assert min(r["neff"] for r in first) < 1.6                        # it starts collapsed
    last = [r for r in d if r["step"] >= 300]
    for layer in (0, 1):                                              # every layer reaches the target
        assert np.mean([r["neff"] for r in last if r["layer"] == layer]) >= 0.8 * 4
    assert np.mean([r["pressure"] for r in last]) < np.mean([r["pressure"] for r in d[:8]])
    gov.remove()


def test_setpoint_run_replays_exactly_and_detects_a_changed_integral(store_root, tiny_model, fake_handle,
                                                                      capsys):
    torch.manual_seed(1)
    model = tiny_model(n_layers=2, d=16, n_experts=4, skew=2.0)
    cfg = ControlConfig(mode="setpoint", neff_target={0: 0.9, 1: 0.6}, kp=1.0, ki=0.3)
    with chrono.open_run(store_root, "sp") as w:
        h = fake_handle(model, writer=w, run_id="sp", flush_every=5)
        gov = govern(model, h, actuators=("bias", "aux"), config=cfg)
        shared = torch.randn(16)
        for _ in range(100):
            h.observe(model(torch.randn(24, 16) * 0.5 + shared))
            h.step()
            gov.step()
        gov.remove()
    assert main(["--root", str(store_root), "replay", "sp"]) == 0
    assert "reproduces all 40 decisions exactly" in capsys.readouterr().out
    path = run_dir(store_root, "sp") / JSONL_NAME
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["mode"] for r in recs} == {"setpoint"} and any(r["integral"] > 0 for r in recs)
    recs[7]["integral"] += 1e-12
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["--root", str(store_root), "replay", "sp"]) == 1
    assert "integral stored" in capsys.readouterr().out
