"""newcomer2: Ctrl-C while detach closes the last window (the part before the writer join).

tests/probes/test_newcomer_interrupt.py covers a Ctrl-C in the join of the background writer.
Here a real SIGINT arrives earlier, in ``Window.close`` (taking the window's counts: the open
window was lost) or in the snapshot callbacks that run after the window is queued
(``chrono.govern``'s controller). Detach holds it until the window is queued, finishes, then
raises KeyboardInterrupt; a second Ctrl-C is not held.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

import chrono
import probes
from probes import window as window_mod


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own SIGINT handler, as in a plain training script (an earlier test of the
    suite, or a framework, may have installed another; detach then leaves Ctrl-C to it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                            num_experts_per_tok=2))


def _train(model, h, steps, seen):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(steps):
        n = len(seen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        h.step()
        assert len(seen) > n


def _count_gates(model):
    seen = []
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            mod.register_forward_hook(lambda m, a, out: seen.append(out[2].numel()))
    return seen


@pytest.mark.parametrize("where", ["window_close", "snapshot_callbacks"])
def test_ctrl_c_while_detach_closes_the_window(tmp_path, monkeypatch, where):
    model = _mixtral()
    seen = _count_gates(model)
    h = probes.attach(model, run="r", root=tmp_path, flush_every=5)
    armed, called = [], []

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)   # what the terminal sends

    def on_snapshot(step, rows, handle):   # a snapshot callback, as chrono.govern registers one
        called.append(step)
        if armed:
            ctrl_c()

    h.on_snapshot(on_snapshot)
    _train(model, h, 8, seen)          # one full window (steps 0-4) closed; steps 5-7 open
    assert called == [4]
    if where == "window_close":
        real = window_mod.Window.close

        def close_with_ctrl_c(self, *a, **k):
            ctrl_c()
            return real(self, *a, **k)

        monkeypatch.setattr(window_mod.Window, "close", close_with_ctrl_c)
    else:
        armed.append(True)
    with pytest.raises(KeyboardInterrupt):
        h.detach()
    monkeypatch.undo()
    assert h.stats()["steps"] == 8
    assert len(h.hooks) == 0                        # every probes hook removed
    assert all(len(m._forward_hooks) == 1 for n, m in model.named_modules() if n.endswith("mlp.gate"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    assert called == [4, 7]                         # the last window reached the callbacks too
    con = chrono.connect(tmp_path)
    steps = [s for (s,) in con.execute("SELECT DISTINCT step FROM routing ORDER BY 1").fetchall()]
    assert steps == list(range(8))    # was [0..4] for a Ctrl-C in Window.close: steps 5-7 lost
    assert con.execute("SELECT sum(tokens) FROM routing").fetchall() == [(sum(seen),)]
    with probes.attach(model, run="r", root=tmp_path) as h2:   # the run is not left locked
        model(input_ids=torch.randint(0, 64, (2, 8)))
    assert h2.current_step == steps[-1] + 2                       # resumed after the stored steps


def test_a_second_ctrl_c_is_not_held(tmp_path, monkeypatch):
    # the first Ctrl-C is held while the window is queued; one more stops at once
    # (a close that waits on a stalled disk must stay interruptible)
    model = _mixtral()
    seen = _count_gates(model)
    h = probes.attach(model, run="r2", root=tmp_path, flush_every=5)
    _train(model, h, 3, seen)
    real = window_mod.Window.close
    after = []

    def close_with_two(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        after.append("first held")
        os.kill(os.getpid(), signal.SIGINT)
        after.append("second held")   # not reached
        return real(self, *a, **k)

    monkeypatch.setattr(window_mod.Window, "close", close_with_two)
    with pytest.raises(KeyboardInterrupt):
        h.detach()
    assert after == ["first held"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    with probes.attach(model, run="r2", root=tmp_path) as h2:   # not left locked
        model(input_ids=torch.randint(0, 64, (2, 8)))
    # the second Ctrl-C stopped at once, as the log line offers: the open window (steps 0-2)
    # was not written, so the run resumes at step 0
    assert h2.current_step == 1


def test_an_application_sigint_handler_is_left_alone(tmp_path, monkeypatch):
    # a framework's own Ctrl-C handler (graceful shutdown) keeps receiving the signal
    got = []
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    model = _mixtral()
    seen = _count_gates(model)
    h = probes.attach(model, run="r3", root=tmp_path, flush_every=5)
    _train(model, h, 3, seen)
    real = window_mod.Window.close

    def close_with_ctrl_c(self, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(window_mod.Window, "close", close_with_ctrl_c)
    h.detach()                                        # no KeyboardInterrupt: the handler took it
    assert got == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    assert chrono.connect(tmp_path).execute("SELECT sum(tokens) FROM routing").fetchall() == [(sum(seen),)]
