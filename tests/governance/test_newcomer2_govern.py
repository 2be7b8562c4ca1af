"""A newcomer's governance session: govern late, resume, govern twice, remove, wrong model.

Ground truth is ``chrono replay``: a fresh controller fed the stored snapshots must give
the stored decisions. Every case here made replay report differences (or silently logged
decisions nothing consumed) before the fixes on branch newcomer2.
"""
import json

import pytest
import torch

import chrono
from chrono.actuators import ActuatorError
from chrono.controller import ControlConfig
from chrono.governance import CONFIG_NAME
from chrono.store import run_dir
from chrono_cli.main import main

probes = pytest.importorskip("probes")

SETPOINT = ControlConfig(mode="setpoint", neff_target=0.95)   # acts on the skewed tiny model


def _train(model, h, gov, steps, shared):
    for _ in range(steps):
        model(torch.randn(32, 16) * 0.5 + shared)
        h.step()
        if gov is not None:
            gov.step()


def _model(tiny_model):
    torch.manual_seed(0)
    return tiny_model(n_layers=2, d=16, n_experts=4, skew=2.0), torch.randn(16)


def _replay(root, run, capsys):
    rc = main(["--root", str(root), "replay", run])
    return rc, capsys.readouterr().out


def _decisions(root, run):
    return chrono.connect(root).execute(
        "SELECT step, layer, pressure, abstain FROM decisions WHERE run_id = ? ORDER BY step, layer",
        [run]).fetchall()


def test_govern_called_after_some_steps_replays(store_root, tiny_model, capsys):
    # The controller starts at the first window after govern(); replay used to feed it every
    # window of the run, so a governor added mid-run never replayed (DIFFERS, exit 1).
    model, shared = _model(tiny_model)
    with probes.attach(model, run="late", root=store_root, flush_every=5) as h:
        _train(model, h, None, 12, shared)
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 20, shared)
    stored = _decisions(store_root, "late")
    assert stored and min(s for s, *_ in stored) == 14 and any(not a for *_, a in stored)
    rc, out = _replay(store_root, "late", capsys)
    assert rc == 0, out
    assert f"reproduces all {len(stored)} decisions exactly" in out


def test_resumed_governed_run_continues_the_controller(store_root, tiny_model, capsys):
    # Re-attaching to a governed run and calling govern again restarted the controller
    # (pressure / PI integral back to their initial values): replay, which sees one run,
    # differed from the stored decisions after the resume.
    # keep_bias: the bias actuator's learnt bias stays on the router across the detach (by default
    # detach restores the router's bias, so a re-attached run routes differently: review 13)
    keep = {"bias": {"keep_bias": True}}
    model, shared = _model(tiny_model)
    for _ in range(2):
        with probes.attach(model, run="resumed", root=store_root, flush_every=5) as h:
            gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT, actuator_kwargs=keep)
            _train(model, h, gov, 20, shared)
    stored = _decisions(store_root, "resumed")
    assert len(stored) == 16
    rc, out = _replay(store_root, "resumed", capsys)
    assert rc == 0, out
    # and the same decisions and routing as one uninterrupted session (an independent run); the
    # pressure alone saturates at 1.0 here, so the routing (Neff per window) is compared too
    model2, shared2 = _model(tiny_model)
    with probes.attach(model2, run="whole", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model2, h, actuators=("bias",), config=SETPOINT, actuator_kwargs=keep)
        _train(model2, h, gov, 40, shared2)
    whole = _decisions(store_root, "whole")
    assert [(s, l, round(p, 12)) for s, l, p, _ in whole] == [(s, l, round(p, 12)) for s, l, p, _ in stored]
    neff = {run: chrono.connect(store_root).execute(
        "SELECT step, layer, round(neff, 9) FROM snapshots WHERE run_id = ? AND layer >= 0 ORDER BY ALL",
        [run]).fetchall() for run in ("resumed", "whole")}
    assert len(neff["whole"]) == 16 and len({n for *_, n in neff["whole"]}) > 2   # it moves
    assert neff["resumed"] == neff["whole"]


def test_resume_with_another_config_is_refused_and_the_config_kept(store_root, tiny_model):
    # control_config.json was overwritten by the second session's config: the first session's
    # decisions could no longer be re-derived (the config they came from was lost).
    model, shared = _model(tiny_model)
    with probes.attach(model, run="cfg", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 10, shared)
    before = (run_dir(store_root, "cfg") / CONFIG_NAME).read_text()
    with probes.attach(model, run="cfg", root=store_root, flush_every=5) as h:
        with pytest.raises(ActuatorError, match="governed with another configuration"):
            chrono.govern(model, h, actuators=("bias",), config=ControlConfig(mode="faithful"))
        _train(model, h, None, 5, shared)                   # the handle stays attached
    assert (run_dir(store_root, "cfg") / CONFIG_NAME).read_text() == before
    assert json.loads(before)["mode"] == "setpoint"


def test_second_govern_on_one_handle_is_refused(store_root, tiny_model, capsys):
    # Two governors on one handle wrote two decisions per (step, layer) and replay failed
    # ("duplicate stored decisions"); the second config overwrote the first.
    model, shared = _model(tiny_model)
    clean = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    with probes.attach(model, run="twice", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",))
        hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
        with pytest.raises(ActuatorError, match="already governed"):
            chrono.govern(model, h, actuators=("temperature",))
        assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
        _train(model, h, gov, 20, shared)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == clean
    stored = _decisions(store_root, "twice")
    assert len(stored) == len(set((s, l) for s, l, *_ in stored)) == 8
    rc, out = _replay(store_root, "twice", capsys)
    assert rc == 0, out


def test_removed_governor_logs_no_decisions_and_can_be_replaced(store_root, tiny_model, capsys):
    # After gov.remove() its snapshot callback still ran: decisions kept being logged under an
    # actuator label although no actuator was left to apply them.
    model, shared = _model(tiny_model)
    with probes.attach(model, run="removed", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 10, shared)
        gov.remove()
        _train(model, h, None, 10, shared)
        assert h.latest_decisions()[0]["step"] == 9
        gov2 = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)   # the same config again
        _train(model, h, gov2, 10, shared)
    steps = sorted({s for s, *_ in _decisions(store_root, "removed")})
    assert steps == [4, 9, 24, 29]                           # nothing while no governor was attached
    rc, out = _replay(store_root, "removed", capsys)
    assert rc == 0, out
    assert "2 windows without stored decisions" in out


def test_govern_refuses_a_model_the_handle_is_not_attached_to(store_root, tiny_model):
    # govern(other_model, h) hooked actuators on a model nobody trained with this handle:
    # the run's decisions steered nothing, silently.
    model, _ = _model(tiny_model)
    other = tiny_model(n_layers=2, d=16, n_experts=4)
    with probes.attach(model, run="other", root=store_root, flush_every=5) as h:
        model(torch.randn(8, 16))
        h.step()
        with pytest.raises(ActuatorError, match="not the model"):
            chrono.govern(other, h, actuators=("bias",))
        with pytest.raises(ActuatorError, match="no module"):
            chrono.govern(torch.nn.Linear(2, 2), h, actuators=("bias",))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in other.modules())


def test_an_actuator_named_twice_is_refused(store_root, tiny_model):
    model, _ = _model(tiny_model)
    with probes.attach(model, run="dup", root=store_root, flush_every=5) as h:
        model(torch.randn(8, 16))
        h.step()
        with pytest.raises(ActuatorError, match="'bias' given twice"):
            chrono.govern(model, h, actuators=("bias", "bias"))


def test_resumed_run_governed_late_with_a_slow_writer_replays(store_root, tiny_model, capsys, monkeypatch):
    # Resumed session, a few steps, then govern: the warm start reads the run's windows from
    # the store, and with a slow disk the windows this session closed were still queued (the
    # controller missed them, replay did not: DIFFERS). govern now waits for queued writes.
    import time

    from chrono.store.writer import RunWriter

    model, shared = _model(tiny_model)
    with probes.attach(model, run="slow", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 10, shared)
    real = RunWriter.flush

    def slow_flush(self):
        time.sleep(0.3)      # a slow disk, on the background writer's thread
        return real(self)

    monkeypatch.setattr(RunWriter, "flush", slow_flush)
    with probes.attach(model, run="slow", root=store_root, flush_every=5) as h:
        _train(model, h, None, 10, shared)
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        assert {d.step for d in gov.latest.values()} == {19}   # it saw the window just closed
        _train(model, h, gov, 10, shared)
    monkeypatch.undo()
    rc, out = _replay(store_root, "slow", capsys)
    assert rc == 0, out


def test_govern_on_a_detached_handle_is_refused(store_root, tiny_model):
    # After the `with probes.attach(...)` block, govern() installed actuators that never got a
    # window: no decision, no effect, no message.
    model, shared = _model(tiny_model)
    with probes.attach(model, run="gone", root=store_root, flush_every=5) as h:
        _train(model, h, None, 5, shared)
    assert h.detached
    with pytest.raises(ActuatorError, match="detached"):
        chrono.govern(model, h, actuators=("bias",))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert "gone" in chrono.store.list_runs(store_root)          # the run with its data is kept


def test_rerecording_a_run_from_step_0_may_change_the_config(store_root, tiny_model, capsys):
    # overwrite=True from step 0 removes every stored decision (and the JSONL mirror's lines):
    # nothing is left that the old control_config.json re-derives, so a new config is fine.
    model, shared = _model(tiny_model)
    with probes.attach(model, run="again", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 10, shared)
    with probes.attach(model, run="again", root=store_root, flush_every=5, start_step=0, overwrite=True) as h:
        gov = chrono.govern(model, h, actuators=("temperature",))
        assert gov.latest == {}                      # a fresh controller: nothing stored to follow
        _train(model, h, gov, 10, shared)
    assert json.loads((run_dir(store_root, "again") / CONFIG_NAME).read_text())["actuator"] == "temperature"
    rc, out = _replay(store_root, "again", capsys)
    assert rc == 0, out


def test_a_handle_that_cannot_be_weakly_keyed_still_governs(store_root, tiny_model, fake_handle):
    # the one-governor-per-handle bookkeeping keys handles weakly; a GovernedHandle that is an
    # eq-dataclass (unhashable) or has __slots__ (no weakref) must still be governable
    class Unhashable(fake_handle):
        __hash__ = None

    model, _ = _model(tiny_model)
    h = Unhashable(model, run_id="u", flush_every=5)
    gov = chrono.govern(model, h, actuators=("bias",))
    for _ in range(10):
        h.observe(model(torch.randn(8, 16)))
        h.step()
        gov.step()
    assert len(h.decisions) == 4
    gov.remove()


@pytest.mark.parametrize("content", ["[1, 2]", "\"setpoint\"", "{not json"])
def test_a_control_config_that_is_not_an_object_is_one_line_everywhere(store_root, tiny_model, capsys,
                                                                       content):
    # Newcomer 2's open item: control_config.json holding a JSON list gave a cryptic replay error
    # ("dictionary update sequence element #0"), and `chrono show` and a second govern() on the
    # run raised AttributeError ('list' object has no attribute 'get').
    model, shared = _model(tiny_model)
    with probes.attach(model, run="cfg", root=store_root, flush_every=5) as h:
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 10, shared)
    path = run_dir(store_root, "cfg") / CONFIG_NAME
    path.write_text(content)
    rc = main(["--root", str(store_root), "replay", "cfg"])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and len(err.strip().splitlines()) == 1
    assert ("JSON object" in err) or ("not readable JSON" in err)
    assert main(["--root", str(store_root), "show", "cfg"]) == 0   # no traceback
    assert "governed" in capsys.readouterr().out
    with probes.attach(model, run="cfg", root=store_root, flush_every=5) as h:   # governs on
        gov = chrono.govern(model, h, actuators=("bias",), config=SETPOINT)
        _train(model, h, gov, 5, shared)
