"""Setpoint round 2 (issue 18): bumpless start (``integral_init``), short control periods, replay.

Expected numbers are worked out by hand from the PI law of chrono.controller.setpoint:
I <- clip(I + ki·e, 0, I_max) unless (kp·e + I > 1 and e > 0); u = clip(kp·e + I, 0, 1).
"""
import json

import numpy as np
import pytest
import torch

import chrono
from chrono.actuators import AuxLossActuator, RouterBiasActuator
from chrono_cli.main import main
from chrono.controller import ControlConfig, Controller, setpoint
from chrono.governance import JSONL_NAME, Governor, govern
from chrono.snapshots import layer_rows
from chrono.store import run_dir

probes = pytest.importorskip("probes")

UNIFORM = np.array([100, 100, 100, 100])          # Neff 4 of 4
SKEWED = np.array([850, 50, 50, 50])              # Neff ~1.8 of 4


def _neff(counts):
    s = counts / counts.sum()
    return float(np.exp(-(s * np.log(s)).sum()))


def _rows(step, counts, period=2):
    return layer_rows("r", step - period + 1, step, {0: counts})


def test_initial_effort_is_the_preset_integral_clipped():
    assert setpoint.initial_effort(0.3266) == 0.3266
    assert setpoint.initial_effort(0.0) == 0.0
    assert setpoint.initial_effort(1.7) == 1.0 and setpoint.initial_effort(-0.2) == 0.0


def test_initial_decisions_and_bumpless_first_update():
    cfg = ControlConfig(actuator="aux", mode="setpoint", neff_target=0.85, integral_init=0.3, kp=2.0, ki=0.2)
    ctl = Controller(2, 4, cfg)
    init = ctl.initial_decisions()
    assert [(d.step, d.layer) for d in init] == [(-1, 0), (-1, 1)]
    assert all(d.effort == d.pressure == 0.3 and d.integral == 0.3 and d.error == 0.0 for d in init)
    assert init[0].target == pytest.approx(3.4) and not init[0].abstain
    assert init[0].lens_scale == pytest.approx(0.3 * 0.02)      # u0 · s_max during warm-up
    # a first window exactly at the target (error 0): the output does not jump
    t = 0.85 * 4
    rows = [dict(r, neff=t) if r["layer"] == 0 else r for r in _rows(1, UNIFORM)]
    (d,) = ctl.update(rows)
    assert d.error == 0.0 and d.integral == pytest.approx(0.3) and d.effort == pytest.approx(0.3)
    # no preset, or faithful mode: nothing to apply before the first window
    assert Controller(1, 4, ControlConfig(mode="setpoint")).initial_decisions() == []
    assert Controller(1, 4, ControlConfig(integral_init=0.5)).initial_decisions() == []


def test_step_response_from_a_preset_integral_relaxes_above_target_and_recovers_below():
    """Above the target the effort is relaxed window by window down to 0; a collapse then raises it
    at once through kp and the integral rebuilds from 0 (not from a wound-up value)."""
    kp, ki, i0 = 2.0, 0.2, 0.3
    ctl = Controller(1, 4, ControlConfig(actuator="aux", mode="setpoint", neff_target=0.85,
                                         kp=kp, ki=ki, integral_init=i0))
    t = 0.85 * 4
    e_up = (t - 4.0) / t                           # uniform routing: -0.1765
    integral, efforts = i0, []
    for k in range(12):
        (d,) = ctl.update(_rows(2 * k + 1, UNIFORM))
        integral = max(0.0, integral + ki * e_up)  # independent arithmetic, never saturated above target
        assert d.integral == pytest.approx(integral) and d.error == pytest.approx(e_up)
        efforts.append(d.effort)
    assert efforts[0] == 0.0                       # kp·e (-0.353) + I (0.265) < 0: clipped at 0
    assert integral == 0.0 and d.abstain           # fully unwound after 9 windows: 0.3 / 0.0353
    e_dn = (t - _neff(SKEWED)) / t                 # collapse: e ~ 0.47, kp·e ~ 0.94
    (d,) = ctl.update(_rows(25, SKEWED))
    assert d.error == pytest.approx(e_dn)
    assert d.integral == pytest.approx(ki * e_dn) and d.effort == pytest.approx(min(1.0, kp * e_dn + ki * e_dn))
    (d2,) = ctl.update(_rows(27, SKEWED))          # now saturated: conditional integration holds I
    assert d2.effort == 1.0 and d2.integral == pytest.approx(d.integral)


def test_anti_windup_holds_the_preset_while_saturated():
    ctl = Controller(1, 4, ControlConfig(mode="setpoint", neff_target=0.9, kp=4.0, integral_init=0.4))
    for k in range(30):
        (d,) = ctl.update(_rows(2 * k + 1, SKEWED))   # far below target: kp·e + I > 1
        assert d.effort == 1.0 and d.integral == 0.4    # saturated, positive error: no integration
    (d,) = ctl.update(_rows(61, UNIFORM))               # target reached: relaxes at once from 0.4
    assert d.effort < 0.4


@pytest.mark.parametrize("bad", [{"integral_init": -0.1}, {"integral_init": 1.2},
                                 {"integral_init": 0.6, "integral_max": 0.5}])
def test_integral_init_outside_the_integral_range_is_refused(bad):
    with pytest.raises(ValueError, match="integral_init"):
        ControlConfig(mode="setpoint", **bad)
    c = ControlConfig(mode="setpoint", integral_init=0.25)
    assert ControlConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_governor_applies_the_preset_before_the_first_window(tiny_model):
    """Bumpless start on the actuators: aux alpha and bias rate sit at the preset effort at step 0."""
    model = tiny_model(n_layers=2, d=16, n_experts=4)
    routers = {i: (l["router"], 4) for i, l in enumerate(model.layers)}
    i0 = (0.1 - 0.003) / (0.3 - 0.003)
    gov = Governor(routers, ("aux", "bias"), ControlConfig(mode="setpoint", integral_init=i0),
                   actuator_kwargs={"aux": {"alpha_min": 0.003, "alpha_max": 0.3}, "bias": {"rate": 0.08}})
    for layer in (0, 1):
        aux, bias = (next(a for a in gov.actuators[layer] if isinstance(a, cls))
                     for cls in (AuxLossActuator, RouterBiasActuator))
        assert aux.alpha == pytest.approx(0.1) and gov.aux_weight(layer) == pytest.approx(0.1)
        assert bias.current_rate == pytest.approx(0.08 * i0)
    assert gov.decisions == []                    # the preset is config, not a logged decision
    gov.remove()
    plain = Governor(routers, ("aux",), ControlConfig(mode="setpoint"),
                     actuator_kwargs={"aux": {"alpha_min": 0.003, "alpha_max": 0.3}})
    assert plain.aux_weight(0) == 0.003           # no preset: the actuator's rest state
    plain.remove()


def test_two_step_control_period_with_probes_replays_exactly(store_root, tiny_model, capsys):
    """A fast sample period is probes' flush_every=2: one snapshot (and decision) per layer every
    2 steps, alerts judged on those windows, and `chrono replay` re-derives every decision,
    the preset integral included."""
    torch.manual_seed(3)
    model = tiny_model(n_layers=2, d=16, n_experts=4, skew=2.0)
    cfg = ControlConfig(mode="setpoint", neff_target=0.85, kp=4.0, ki=0.04, integral_init=0.3266)
    shared = torch.randn(16)
    with probes.attach(model, run="fast", root=store_root, flush_every=2) as h:
        gov = chrono.govern(model, h, actuators=("aux",), config=cfg,
                            actuator_kwargs={"aux": {"alpha_min": 0.003, "alpha_max": 0.3}})
        assert gov.aux_weight(0) == pytest.approx(0.1, abs=1e-4)
        for _ in range(40):
            model(torch.randn(32, 16) * 0.5 + shared)
            h.step()
            gov.step()
        gov.remove()
    con = chrono.connect(store_root)
    steps = [r[0] for r in con.execute("SELECT DISTINCT step FROM decisions WHERE run_id='fast' ORDER BY step")
             .fetchall()]
    assert steps == list(range(1, 40, 2))         # a decision every 2 steps
    recs = [json.loads(x) for x in (run_dir(store_root, "fast") / JSONL_NAME).read_text().splitlines()]
    assert recs[0]["integral"] != pytest.approx(0.0)      # started from the preset, not from 0
    assert main(["--root", str(store_root), "replay", "fast"]) == 0
    assert "reproduces all 40 decisions exactly" in capsys.readouterr().out
    cfg_path = run_dir(store_root, "fast") / "control_config.json"
    stored = json.loads(cfg_path.read_text())
    assert stored["integral_init"] == 0.3266
    cfg_path.write_text(json.dumps(dict(stored, integral_init=0.0)))   # replay without the preset differs
    assert main(["--root", str(store_root), "replay", "fast"]) == 1
