import numpy as np
import pytest
import torch

from chrono.controller import ControlConfig, Controller
from chrono.governance import govern
from chrono.lens import ChronoLens
from chrono.snapshots import layer_rows


def _windows(n_windows=30, seed=0):
    """Snapshot rows of a 2-layer run drifting into collapse (layer 0) and staying healthy (layer 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for w in range(n_windows):
        skew = min(1.0, w / 15)
        c0 = rng.multinomial(1000, np.array([1 + 30 * skew, 1 + 5 * skew, 1, 1]) / (4 + 36 * skew))
        c1 = rng.multinomial(1000, [0.25] * 4)
        if w == 7:
            c1 = np.zeros(4, int)   # an idle window for layer 1
        out.append(layer_rows("r", w * 10, w * 10 + 9, {0: c0, 1: c1}))
    return out


def test_same_snapshots_give_identical_decisions():
    runs = []
    for _ in range(2):
        ctl = Controller(2, 4)
        runs.append([d.as_row() for rows in _windows() for d in ctl.update(rows)])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 60
    assert any(not r["abstain"] for r in runs[0])          # it does act on the collapsing layer


def test_decisions_follow_policy_and_set_lens_scale():
    ctl = Controller(2, [4, 4])
    lenses = {0: ChronoLens(8, layer_id=0), 1: ChronoLens(8, layer_id=1)}
    decisions = []
    for rows in _windows():
        decisions.extend(ctl.update(rows, lenses))
    l0 = [d for d in decisions if d.layer == 0]
    assert l0[-1].pressure > 0.1 and l0[-1].lens_scale > 0.02
    assert lenses[0]._scale_value == l0[-1].lens_scale
    # warm-up cap: before step 100 the scale never exceeds 0.02
    assert all(d.lens_scale <= 0.02 + 1e-15 for d in decisions if d.step < 100)
    idle = [d for d in decisions if d.layer == 1 and d.step == 79]
    assert idle[0].abstain and idle[0].reason.startswith("idle") and idle[0].lens_scale == 0.0
    healthy = [d for d in decisions if d.layer == 1 and d.step > 100]
    assert all(d.abstain and "pressure < 0.01" in d.reason for d in healthy)


def test_config_roundtrip_and_unknown_fields():
    c = ControlConfig(actuator="bias")
    assert ControlConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        ControlConfig.from_dict({"nope": 1})


def test_closed_loop_raises_lens_scale_after_alert(tiny_model, fake_handle):
    """A routing that collapses onto one expert raises PRE_COLLAPSE; the controller then turns the lens up."""
    torch.manual_seed(0)
    model = tiny_model(n_layers=1, d=16, n_experts=4, skew=3.0)
    h = fake_handle(model, flush_every=5)
    lenses = {0: ChronoLens(16, layer_id=0)}
    gov = govern(model, h, actuators=("lens",), lenses=lenses)
    shared = torch.randn(16)
    scales_after_alert = []
    for step in range(200):
        x = torch.randn(32, 16) * 0.3 + shared       # shared direction: expert 0 wins
        h.observe(model(x))
        h.step()
        gov.step()
        if h.transitions:
            scales_after_alert.append(lenses[0]._scale_value)
    raised = [t for t in h.transitions if t["alert"] == "PRE_COLLAPSE" and t["transition"] == "raised"]
    assert raised, "the workload must raise PRE_COLLAPSE"
    first_alert_step = raised[0]["step"]
    before = [d["lens_scale"] for d in h.decisions if d["step"] < first_alert_step]
    after = [d["lens_scale"] for d in h.decisions if d["step"] >= 100]
    assert max(after) > max(before) and max(after) > 0.1
    assert all(d["run_id"] == "run" for d in h.decisions)
    gov.remove()


def _faithful_by_hand(windows, warmup_steps, s_warm, s_late):
    """DESIGN §4's faithful policy written out independently: {(step, layer): lens scale}."""
    def clip(x, lo=0.0, hi=1.0):
        return max(lo, min(hi, x))

    state, out = {}, {}
    for rows in windows:
        for r in rows:
            if r["layer"] < 0 or r["token_count"] == 0:
                continue
            n, neff, top2, dead = r["n_experts"], r["neff"], r["top2_share"], r["dead"]
            debt = clip(0.4 * clip((0.6 * n - neff) / (0.6 * n)) + 0.4 * clip((top2 - 0.75) / 0.25)
                        + 0.2 * clip(dead / max(1, n - 1)))
            p, b, last_top2, last_s = state.get(r["layer"], (0.0, 1.0, None, 0.0))
            p = 0.8 * p + 0.2 * debt
            b = 0.5 * b if last_top2 is not None and last_s > 0.01 and top2 - last_top2 > 0.02 \
                else b + 0.2 * (1 - b)
            cap = s_warm if r["step"] < warmup_steps else s_late
            s = 0.0 if (b < 0.15 or p < 0.01) else clip(min(p, 0.5), 0.0, cap) * b
            state[r["layer"]] = (p, b, top2, s)
            out[(r["step"], r["layer"])] = s
    return out


@pytest.mark.parametrize("bounds", [(100, 0.02, 0.5), (40, 0.05, 0.3), (0, 0.1, 0.1)])
def test_lens_scale_uses_the_configured_bounds(bounds):
    """The controller's lens scale is policy.lens_scale under ControlConfig's warm-up and s_max."""
    warmup, s_warm, s_late = bounds
    ctl = Controller(2, 4, ControlConfig(warmup_steps=warmup, s_max_warmup=s_warm, s_max=s_late))
    windows = _windows(40, seed=3)
    got = {(d.step, d.layer): d.lens_scale for rows in windows for d in ctl.update(rows)
           if not d.reason.startswith("idle")}
    want = _faithful_by_hand(windows, warmup, s_warm, s_late)
    assert got.keys() == want.keys()
    assert got == pytest.approx(want, abs=1e-12)
    assert any(v > 0 for v in got.values())   # the workload makes it act
