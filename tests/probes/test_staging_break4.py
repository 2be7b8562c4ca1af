"""Fourth review of staged counting: the hook's hot path (``Stage.push``) against another
thread's flush, routers whose logits or weights are inference tensors in a normal forward, a
recorder growth that fails (``Window.saw``: widest <= capacity), the one-op logit sum with
empty forwards and early flushes, and ``attach(staging=False)`` differentially against staged
counting (threads, inference mode, HF models). Helpers and ground truth: ``staging_review.py``
(the test's own forward hooks, registered before probes attach, counted with NumPy).
"""
from __future__ import annotations

import threading

import pytest
import torch

import chrono
import probes
from probes import staging
from probes.recorder import Recorder

from . import probe_models as T
from .staging_review import D, IDS, K, Router, MoE, truth_hooks, count, stored, signals, diff, run

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")


# ----------------------------------------------------------------------------- inference tensors


class InferenceLogits(Router):
    """Computes its logits (``logits``) or its weights (``weights``) under
    ``torch.inference_mode`` inside a normal forward: that output is an inference tensor (no
    version counter), the indices are not (inference weights only work under ``no_grad``: autograd
    refuses to save them)."""

    def __init__(self, which):
        super().__init__()
        self.which = which

    def forward(self, x):
        if self.which == "logits":
            with torch.inference_mode():
                logits = self.proj(x)[..., : self.width]
            w, idx = torch.topk(logits.softmax(-1), K, dim=-1)
            return logits, w, idx
        logits = self.proj(x)[..., : self.width]
        idx = torch.topk(logits, K, dim=-1).indices
        with torch.inference_mode():
            w = logits.detach().softmax(-1).gather(-1, idx)
        return logits, w, idx


@pytest.mark.parametrize("n_routers", [2, 9])
@pytest.mark.parametrize("which, ctx", [("logits", torch.no_grad), ("logits", torch.enable_grad),
                                        ("weights", torch.no_grad)], ids=["logits", "logits_grad", "weights"])
def test_a_router_with_inference_tensor_outputs_in_a_normal_forward_is_counted(store_root, which, ctx, n_routers):
    """Was (before this review): reading the logits' (or weights') version counter raised
    "Inference tensors do not track version counter" in ``Stage.add`` / ``Stage.push``: every
    call of that router was lost, one fault each (measured: 4 faults, router 0 stored 0 of
    168 assignments). Now such a call is counted at once, exactly, without a fault; the other
    routers are staged."""
    model = MoE([InferenceLogits(which)] + [Router() for _ in range(n_routers - 1)])
    truth, got, stats, states = run(model, store_root, "inf", steps=4, ctx=ctx)
    assert diff(truth, got) == [] and stats["faults"] == 0
    assert states[1:] == [staging.STAGED] * (n_routers - 1)


# ----------------------------------------------------------------------------- another thread's flush


class Gated(Router):
    """``n_experts`` is a property; ``gate = (thread, reached, go)``: that thread's next read
    (the hot path reads it between its state check and ``Stage.push``) waits for ``go``."""
    gate = None

    @property
    def n_experts(self):
        g = self.gate
        if g is not None and threading.current_thread() is g[0]:
            self.gate = None
            g[1].set()
            assert g[2].wait(10)
        return self._n

    @n_experts.setter
    def n_experts(self, v):
        self._n = v


class Normalizing(MoE):
    """Once ``normalize`` is set, rescales router 0's weights in place after it returned."""
    normalize = False

    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for i in self.order:
            _, w, idx = self.routers[i](x)
            if self.normalize and i == 0:
                w.mul_(1.5)   # a version bump: staged counting must not count this call
            x = x + (w[..., None] * self.table[idx]).sum(1)
        return x.sum()


def test_a_call_in_its_hook_when_another_threads_flush_makes_the_router_eager(store_root):
    """Router 0 is staged; then the model starts changing its weights in place. Thread A's
    forward calls router 0 and its hook stops between the state check (STAGED) and the push;
    meanwhile this thread's forward stages router 0's call, changes it, and its flush drops it
    with one fault and makes router 0 eager ("counted at once from now on"). A's push, ordered
    after that flush by the lock, must then count A's call at once.
    Was: the push staged it anyway (the state was read outside the lock), A's own change
    dropped it too: 2 faults, router 0 stored 84 of the 126 assignments that should count
    (168 returned, 42 of this thread's dropped call by design)."""
    model = Normalizing([Gated(), Router()])
    calls = truth_hooks(model)
    reached, go, errors = threading.Event(), threading.Event(), []

    def forward_a():
        try:
            with torch.no_grad():
                model(IDS)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    with probes.attach(model, run="race", root=store_root, steps="manual", flush_every=10) as h:
        with torch.no_grad():
            model(IDS)
            model(IDS)
            assert h._window.rec.stage.state == [staging.STAGED] * 2
            model.normalize = True
            a = threading.Thread(target=forward_a)
            model.routers[0].gate = (a, reached, go)
            a.start()
            assert reached.wait(10)
            n_before = len(calls)
            model(IDS)   # this thread's call of router 0 is dropped by design
            dropped = [c for c in calls[n_before:] if c[0] == 0]
            go.set()
            a.join(10)
        h.step()
    assert not errors and not a.is_alive()
    assert h.stats()["faults"] == 1
    want = count([c for c in calls if c[0] == 0])
    for key, (n, w) in count(dropped).items():
        want[key] = (want[key][0] - n, want[key][1] - w)
    got = {k: v for k, v in stored(store_root, "race")[0].items() if k[0] == 0}
    assert diff([{k: v for k, v in want.items() if v[0]}], {0: got}) == []
    assert sum(n for n, _ in got.values()) == 126


# ----------------------------------------------------------------------------- widest <= capacity


@pytest.mark.parametrize("where", ["before", "third_buffer"])
def test_a_recorder_growth_that_fails_once_does_not_spoil_the_rest_of_the_window(store_root, monkeypatch, where):
    """Router 0 (called twice per forward) grows from 8 to 40 experts at step 3; widening the
    recorder fails once (e.g. out of device memory). That call is lost with one fault; the
    second call of the forward and the later steps of the window are exact.
    Was: ``Window.saw`` set the window's widest to 40 before growing; with the growth failed,
    widest (40) exceeded the capacity (8), later calls skipped ``saw`` and their experts >= 8
    were stored as invalid: 143 "indices outside [0, 40)" reported, 21 cells wrong."""
    model = MoE([Router(), Router()], order=[0, 1, 0])
    real, box = Recorder.grow, {"fail": 1, "step": 0}
    lost: list = []

    def grow(self, capacity):
        if box["fail"] and where == "before":
            box["fail"] -= 1
            raise torch.OutOfMemoryError("simulated: no memory to widen the recorder")
        real(self, capacity)

    real_zeros = torch.zeros

    def zeros(*shape, **kw):   # "third_buffer": the history buffer of the wider recorder fails
        if box["fail"] and where == "third_buffer" and len(shape[0]) == 5 and shape[0][-1] == 42:
            box["fail"] -= 1
            raise torch.OutOfMemoryError("simulated: no memory for the wider history buffer")
        return real_zeros(*shape, **kw)

    def first_call_of_step_3(m, args, out):
        if box["step"] == 3 and not lost:
            lost.append((0, out[2].detach().clone(), out[1].detach().clone().double(), True))

    model.routers[0].register_forward_hook(first_call_of_step_3)
    monkeypatch.setattr(Recorder, "grow", grow)
    monkeypatch.setattr(torch, "zeros", zeros)

    def before(s, h):
        box["step"] = s
        if s == 3:
            model.routers[0].n_experts = model.routers[0].width = 40

    truth, got, stats, states = run(model, store_root, "growfail", steps=6, before=before, flush_every=10)
    for key, (n, w) in count(lost).items():
        truth[3][key] = (truth[3][key][0] - n, truth[3][key][1] - w)
    truth[3] = {k: v for k, v in truth[3].items() if v[0]}
    assert max(e for (layer, e) in truth[5] if layer == 0) >= 8   # experts past the old capacity
    assert diff(truth, got) == []
    assert stats["faults"] == 1 and stats["invalid_indices"] == 0


# ----------------------------------------------------------------------------- one-op logit sum


def test_an_empty_forward_with_ten_routers_keeps_them_staged(store_root):
    """The one-op sum's layout with ``[0, E]`` logits of ten calls (nothing to sum) is counted
    without a fault, and the routers stay staged (holds)."""
    model = MoE([Router() for _ in range(10)])
    box: dict = {}

    def before(s, h):
        box["s"] = s

    truth, got, stats, states = run(model, store_root, "empty10", steps=5, before=before,
                                    call=lambda ids: model(ids[:, :0] if box["s"] == 3 else ids))
    assert truth[3] == {} and diff(truth, got) == [] and stats["faults"] == 0
    assert states == [staging.STAGED] * 10


def test_an_early_flush_mid_forward_splits_the_one_op_sum_and_flags_exactly(store_root, monkeypatch):
    """Twelve routers, ``MAX_LOGITS`` set to nine calls' logits: the hot path hands the tenth
    call over (the general path flushes the nine first, one-op sum) and the rest of the forward
    is a flush of three (one sum per call). A NaN logit of router 4 at step 2 and of router 10
    at step 3 (``logit_scale``) is flagged on exactly those (step, layer) (holds)."""
    model = MoE([Router() for _ in range(12)])
    monkeypatch.setattr(staging, "MAX_LOGITS", 9 * 21 * 8)

    def before(s, h):
        for i, r in enumerate(model.routers):
            r.logit_scale = float("nan") if (s, i) in ((2, 4), (3, 10)) else None

    truth, got, stats, states = run(model, store_root, "early", steps=5, before=before, flush_every=1)
    assert diff(truth, got) == [] and stats["faults"] == 0
    assert [(s, layer) for s, layer, _ in signals(store_root, "early", "probes.nonfinite")] == [(2, 4), (3, 10)]
    assert states == [staging.STAGED] * 12


# ----------------------------------------------------------------------------- staging=False


def _routing(root, run_id):
    return chrono.connect(root).execute(
        "select step, layer, expert, mode, tokens, round(weight_sum, 9) from routing where run_id = ? "
        "and tokens > 0 order by all", [run_id]).fetchall()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "jetmoe", "switch_transformers"])
def test_staging_off_and_on_store_the_same_rows_for_hf_models(store_root, family):
    """Two handles on one random-weight HF model, ``staging=False`` and the default: steps of
    training with backward, eval, ``no_grad`` and ``inference_mode``; both runs store the same
    rows (step, layer, expert, mode, tokens, weight sum) (holds; qwen2_moe, qwen3_moe, olmoe,
    phimoe, granitemoe held too, left out for time)."""
    model = getattr(T, family)()
    inputs = T.batch(model)
    with probes.attach(model, run="off", root=store_root, steps="manual", flush_every=2, staging=False) as off, \
            probes.attach(model, run="on", root=store_root, steps="manual", flush_every=3) as on:
        for what in ["train", "train", "eval", "no_grad", "inference", "train"]:
            model.train(what == "train")
            if what == "train":
                model(**inputs).logits.sum().backward()
            else:
                with torch.inference_mode() if what == "inference" else torch.no_grad():
                    model(**inputs)
            off.step()
            on.step()
        assert set(off._window.rec.stage.state) == {staging.EAGER} and not off._window.rec.stage.calls
        # (Switch routers drop tokens past capacity: counted at once, never staged)
        assert (staging.STAGED in on._window.rec.stage.state) == (family != "switch_transformers")
    assert _routing(store_root, "off") == _routing(store_root, "on") != []
    assert off.stats()["faults"] == on.stats()["faults"] == 0


def test_staging_off_from_two_threads_under_inference_mode(store_root):
    """``staging=False`` on a nine-router model (copies would be staged from eight): two
    threads run forwards under ``inference_mode`` and ``no_grad``; every call is counted
    exactly and nothing is ever staged (holds)."""
    model = MoE([Router() for _ in range(9)])
    calls = truth_hooks(model)
    barrier, errors = threading.Barrier(2), []

    def work(ctx):
        try:
            barrier.wait(10)
            for _ in range(3):
                with ctx():
                    model(IDS)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    with probes.attach(model, run="thr", root=store_root, steps="manual", flush_every=5, staging=False) as h:
        threads = [threading.Thread(target=work, args=(c,)) for c in (torch.inference_mode, torch.no_grad)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        stage = h._window.rec.stage
        assert set(stage.state) == {staging.EAGER} and not stage.calls and not stage.watch
        h.step()
    assert not errors
    assert diff([count(calls)], stored(store_root, "thr")) == [] and h.stats()["faults"] == 0


# ----------------------------------------------------------------------------- window close mid-forward


def _totals(per_step) -> dict:
    out: dict = {}
    for cells in per_step.values() if isinstance(per_step, dict) else per_step:
        for key, (n, w) in cells.items():
            t = out.get(key, (0, 0.0))
            out[key] = (t[0] + n, t[1] + w)
    return out


def test_a_window_closed_in_mid_forward_after_growth_then_a_prune(store_root):
    """At step 3, router 1 grows to 40 experts before its first call (staged; the recorder
    widens), is pruned back to 8 after it, then ``h.flush()`` closes the window in mid-forward
    (the staged calls counted, the window's widest reset) and router 1 is called again with 8.
    Nothing is lost or counted twice (all steps summed: the flush splits that forward's
    step), no invalid index is reported, and the closed window's rows reach expert 39 (holds)."""
    model = MoE([Router(), Router(), Router()], order=[0, 1, 2, 1])
    box: dict = {"s": 0}
    r = model.routers[1]

    def after(pos, i):
        if box["s"] != 3:
            return
        if pos == 0:
            r.n_experts = r.width = 40
        elif pos == 1:
            r.n_experts = r.width = 8
            box["h"].flush()

    def before(s, h):
        box["s"], box["h"] = s, h

    model.after = after
    truth, got, stats, states = run(model, store_root, "midclose", steps=5, before=before, flush_every=2)
    assert diff([_totals(truth)], {0: _totals(got)}) == []
    assert max(e for (layer, e) in _totals(got) if layer == 1) >= 8
    assert stats["faults"] == 0 and stats["invalid_indices"] == 0
    assert states == [staging.STAGED] * 3
