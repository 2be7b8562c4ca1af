"""Staged counting (probes/staging.py) against models that change router outputs in place.

Found by a review of the first version of staging (which watched only a router's first call,
trusted weights and everything under inference mode after probation, judged probation at any
flush, staged calls made outside a forward, and summed float16 logits in float16); each test
failed on it and passes now. Ground truth: the plain forward hook of
``test_staging.truth_hooks`` (registered before probes attach), which clones indices and
weights as each router returns, counted with NumPy.

What a correct probe may do instead of counting exactly: drop the changed call and report a
telemetry fault (``test_staging.test_indices_changed_in_place_after_probation_are_not_counted_and_reported``).
What it may not do is store other values than the router returned, silently.
"""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import torch

import probes

from .test_staging import E, L, MoE, counted, run_steps, stored, truth_hooks
from .test_staging import copies_always  # noqa: F401  (autouse: inference calls staged as copies)

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")


def wrong_cells(truth, got, stats) -> list:
    """(step, layer, truth tokens, stored tokens, truth weight sum, stored weight sum) of every
    (step, layer) that is neither exact nor dropped-and-reported (nothing counted, a fault)."""
    bad = []
    for s, (tok, w) in enumerate(truth):
        g_tok, g_w = got.get(s, (np.zeros((L, E), np.int64), np.zeros((L, E))))
        for layer in range(L):
            if np.array_equal(g_tok[layer], tok[layer]) and np.allclose(g_w[layer], w[layer], rtol=1e-5):
                continue
            if g_tok[layer].sum() == 0 and stats["faults"] > 0:
                continue
            bad.append((s, layer, tok[layer].tolist(), g_tok[layer].tolist(),
                        round(float(w[layer].sum()), 4), round(float(g_w[layer].sum()), 4)))
    return bad


def _forward_mutating_weights(model, which):
    """Replace ``model.forward``: each router's weights are halved in place after it returns,
    ``which(j)`` for its j-th call in the forward (and only while ``model.mutate_now``)."""
    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).reshape(-1, self.emb.embedding_dim)
        for r in self.routers:
            for j in range(2 if self.twice else 1):
                _, w, idx = r(x)
                use = idx.long().clone()
                if self.mutate_now and which(j):
                    w.div_(2.0)   # e.g. a renormalisation the model applies after the router
                x = x + (w[..., None] * self.table[use]).sum(1)
        return x.sum()
    model.forward = types.MethodType(forward, model)
    return model


def test_weights_changed_in_place_after_probation_are_not_stored_silently(store_root):
    """Training; from step 3 the model halves each router's weights in place after the router
    (indices untouched). Probation (step 0) saw no change: the routers are staged, and the
    staged weight sums of steps 3-4 are the halved values, no fault. (The eager path, and a
    model that does this from the first forward, are exact.)"""
    model = _forward_mutating_weights(MoE(), lambda j: True)

    def before(s, h):
        model.mutate_now = s >= 3

    truth, got, states, stats = run_steps(model, store_root, "wl", steps=5, before_step=before)
    assert wrong_cells(truth, got, stats) == []


def test_weights_changed_in_place_by_a_later_call_of_a_shared_router(store_root):
    """A router called twice per forward (shared by two blocks); the second block renormalises
    the weights in place, every forward from the first one. Probation watches only the first
    call of the slot, which nothing changes: the slot is staged, and from step 1 on the second
    call's weights are stored halved."""
    model = _forward_mutating_weights(MoE(twice=True), lambda j: j == 1)
    model.mutate_now = True
    truth, got, states, stats = run_steps(model, store_root, "ws", steps=3)
    assert wrong_cells(truth, got, stats) == []


def test_router_called_outside_a_forward_then_its_weights_changed_by_the_caller(store_root):
    """A staged router called directly (no model forward: nothing flushes until ``h.step()``);
    the caller then normalises the returned weights in place, as analysis code does. The stage
    still holds a reference, and the step stores the changed weights (~0.4x), no fault. (Its
    indices changed the same way are dropped and reported: only weights are trusted.)"""
    model = MoE()
    calls = truth_hooks(model)
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    truth = []
    with probes.attach(model, run="of", root=store_root, steps="manual") as h:
        model(ids).backward()          # probation passes: routers staged
        truth.append(counted(calls))
        h.step()
        del calls[:]
        with torch.no_grad():
            for r in model.routers:
                _, w, _ = r(x)
                w.div_(w.sum(-1, keepdim=True) * 4)
        truth.append(counted(calls))
        h.step()
        stats = h.stats()
    assert wrong_cells(truth, stored(store_root, "of"), stats) == []


def test_indices_changed_in_place_under_inference_mode_after_probation(store_root):
    """Under ``torch.inference_mode`` (inference tensors: no version counter) the model remaps
    the indices in place from step 3 on. Staged calls are trusted: the stored tokens of steps
    3-4 are the remapped experts' (each layer's counts shifted by one expert), no fault."""
    model = MoE(mutate="indices")

    def before(s, h):
        model.mutate_now = s >= 3

    truth, got, states, stats = run_steps(model, store_root, "ii", steps=5, infer=True, before_step=before)
    assert wrong_cells(truth, got, stats) == []


def test_probation_is_judged_by_another_threads_forward(store_root):
    """Threaded inference on a model that halves router weights in place after every router
    (which should keep every router eager). Thread A's first forward is the probation call of
    each router; before A's model changes the last router's weights, thread B runs a whole
    forward, whose end flushes the stage and judges A's watched tensors: the last router's are
    unchanged yet, so it is staged (the others, already changed, stay eager). Every later
    forward's weight sums of that layer are then stored halved. Deterministic: events, no sleeps."""
    model = MoE(mutate="weights")
    paused, resume = threading.Event(), threading.Event()
    inner = MoE.forward

    def forward(self, input_ids, attention_mask=None):
        if threading.current_thread().name != "A":
            return inner(self, input_ids, attention_mask)
        x = self.emb(input_ids).reshape(-1, self.emb.embedding_dim)
        for i, r in enumerate(self.routers):
            _, w, idx = r(x)
            use = idx.long().clone()
            if i == L - 1:   # every router of this forward has returned; A pauses before its last change
                paused.set()
                assert resume.wait(60)
            w.div_(2.0)
            x = x + (w[..., None] * self.table[use]).sum(1)
        return x.sum()

    model.forward = types.MethodType(forward, model)
    calls = truth_hooks(model)
    ids = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(0))
    with probes.attach(model, run="th", root=store_root, steps="manual", flush_every=2) as h:
        def run_a():
            with torch.inference_mode():
                model(ids)

        a = threading.Thread(target=run_a, name="A")
        a.start()
        assert paused.wait(60)
        with torch.inference_mode():
            model(ids)          # thread B (this one): a whole forward while A is paused
        resume.set()
        a.join()
        h.step()
        truth = [counted(calls)]
        for _ in range(2):      # later steps, one thread
            del calls[:]
            with torch.inference_mode():
                model(ids)
            truth.append(counted(calls))
            h.step()
        stats = h.stats()
    assert wrong_cells(truth, stored(store_root, "th"), stats) == []


def test_finite_fp16_logits_are_not_flagged_nonfinite(store_root):
    """fp16 router with finite logits (a constant offset of +30: softmax, top-k and weights
    unchanged; routers' logits drift like this without a z-loss) over 16 x 64 tokens. The
    probation forward is counted eagerly, whose logit sum ``logits.sum()`` is taken in fp16:
    5 x 1024 logits of ~30 sum past 65504 -> inf, and every layer is flagged non-finite."""
    model = MoE().half()
    with torch.no_grad():
        for r in model.routers:
            r.proj.bias.add_(30.0)
    finite = []
    for r in model.routers:
        r.register_forward_hook(lambda mod, a, out: finite.append(bool(torch.isfinite(out[0]).all())))
    ids = torch.randint(1, 97, (16, 64), generator=torch.Generator().manual_seed(0))
    with probes.attach(model, run="fp16", root=store_root, steps="manual", flush_every=3) as h:
        for _ in range(3):
            with torch.inference_mode():
                model(ids)
            h.step()
    assert finite and all(finite)
    assert h.stats()["nonfinite"] == 0
