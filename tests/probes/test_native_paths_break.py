"""Review of where and when router calls are counted on CPU since the C counting (``probes.native``,
e0302ca): the hook's second hot path (calls counted at once: ``inference_mode``, eager routers),
inference calls no longer staged as copies, the staged flush in one C call. Every test runs with
both counting backends (``tests/probes/conftest.py``). Ground truth: the test's own forward hooks on
the routers (registered before probes attach), counted with NumPy (``staging_review.count``).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import chrono
import probes

from .staging_review import D, IDS, K, MoE, Router, count, diff, stored

pytestmark = pytest.mark.usefixtures("backend")


class InPlace(Router):
    """Renormalises its weights in place after routing: counted at once for good (EAGER)."""

    def forward(self, x):
        logits, w, idx = super().forward(x)
        w /= w.sum(-1, keepdim=True)
        return logits, w, idx


class PenaltyMoE(MoE):
    """Each router call in a non-reentrant activation checkpoint; the forward itself takes the
    gradient of its output w.r.t. the embeddings (an input-gradient penalty), which recomputes
    every checkpointed router call in a backward run *inside* the top-level forward.
    ``self.in_backward`` is the test's own flag, set around that gradient and ``backward()``."""
    in_backward = False

    def forward(self, input_ids):
        x = x0 = self.emb(input_ids).reshape(-1, D)
        for i in self.order:
            def block(x, r=self.routers[i]):
                _, w, idx = r(x)[:3]
                return x + (w[..., None] * self.table[idx]).sum(1)
            x = checkpoint(block, x, use_reentrant=False)
        type(self).in_backward = True
        try:
            g, = torch.autograd.grad(x.pow(2).sum(), x0, retain_graph=True)
        finally:
            type(self).in_backward = False
        return x.sum() + g.detach().pow(2).sum()


@pytest.mark.parametrize("staging", [True, False], ids=["staged", "staging_off"])
@pytest.mark.parametrize("eager", [False, True], ids=["clean_routers", "router0_in_place"])
def test_a_recompute_in_a_backward_inside_the_forward_is_not_counted(store_root, staging, eager):
    """A checkpointed router recomputed by a backward that runs inside the running top-level
    forward (``torch.autograd.grad`` in ``forward``) must not be counted: its tokens were counted
    when the forward called it. Truth: calls made outside the test's own ``in_backward`` flag, all
    TRAIN. Steps 0 (probation), 1-2 (staged, or eager: the C hot path)."""
    model = PenaltyMoE([InPlace() if eager and i == 0 else Router() for i in range(3)])
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: None if PenaltyMoE.in_backward else calls.append(
            (i, out[2].detach().clone().long(), out[1].detach().clone().double(), True)))
    truth = []
    with probes.attach(model, run="pen", root=store_root, steps="manual", flush_every=2, staging=staging) as h:
        for _ in range(3):
            del calls[:]
            loss = model(IDS)
            PenaltyMoE.in_backward = True
            try:
                loss.backward()
            finally:
                PenaltyMoE.in_backward = False
            truth.append(count(calls, 3))
            h.step()
    assert all(sum(t for t, _ in step.values()) == 3 * IDS.numel() * K for step in truth)
    modes = chrono.connect(store_root).execute("select distinct mode from routing where run_id = 'pen'").fetchall()
    assert diff(truth, stored(store_root, "pen")) == [] and modes == [("TRAIN",)]
    assert h.stats()["faults"] == 0


class InferenceInside(MoE):
    """Router 1 runs under ``torch.inference_mode`` inside a normal forward (its outputs are
    inference tensors; the forward's mode is the top-level forward's)."""

    def forward(self, input_ids):
        x = self.emb(input_ids).reshape(-1, D)
        for i in self.order:
            if i == 1 and not torch.is_inference_mode_enabled():
                with torch.inference_mode():
                    _, w, idx = self.routers[i](x.detach())[:3]
                w, idx = w.clone(), idx.clone()
            else:
                _, w, idx = self.routers[i](x)[:3]
            x = x + (w[..., None] * self.table[idx]).sum(1)
        return x.sum()


@pytest.mark.parametrize("n_routers", [3, 9])
def test_modes_of_calls_counted_at_once_and_staged_in_one_session(store_root, n_routers):
    """One session mixing what decides where a call is counted: router 0 counted at once for
    good (EAGER, renormalises in place), router 1 called under ``inference_mode`` inside the
    training / no_grad forwards, the others on probation then staged; training forwards,
    ``inference_mode`` forwards (C hot path: at once, on probation too, few or many routers),
    ``no_grad`` forwards and a router called by hand between forwards. Every (step, mode, layer,
    expert) cell equals the truth: the test's own hooks, each call tagged with the mode of the
    loop's own context (a call by hand: its own context)."""
    model = InferenceInside([InPlace()] + [Router() for _ in range(n_routers - 1)])
    where = {"mode": None}
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append(
            (where["mode"], i, out[2].detach().clone().long().reshape(-1), out[1].detach().clone().double().reshape(-1))))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plan = [("INFER", torch.inference_mode), ("TRAIN", torch.enable_grad), ("EVAL", torch.no_grad)]
    truth: dict = {}
    with probes.attach(model, run="modes", root=store_root, steps="manual", flush_every=2) as h:
        for step in range(4):
            del calls[:]
            for mode, ctx in (plan if step % 2 else plan[::-1]):
                where["mode"] = mode
                with ctx():
                    out = model(IDS)
                if mode == "TRAIN":
                    out.backward()
                    opt.step()
                    opt.zero_grad()
            where["mode"] = "INFER"
            with torch.inference_mode():   # by hand, outside any top-level forward
                model.routers[2](torch.randn(5, D))
            for mode, layer, idx, w in calls:
                for e, weight in zip(idx.tolist(), w.tolist()):
                    t, s = truth.get((step, mode, layer, e), (0, 0.0))
                    truth[step, mode, layer, e] = (t + 1, s + weight)
            h.step()
    got = {(s, m, l, e): (n, w) for s, m, l, e, n, w in chrono.connect(store_root).execute(
        "select step, mode, layer, expert, tokens, weight_sum from routing where run_id = 'modes' and tokens > 0").fetchall()}
    assert sorted(got) == sorted(truth)
    bad = [(k, truth[k], got[k]) for k in truth if truth[k][0] != got[k][0]
           or abs(truth[k][1] - got[k][1]) > 1e-4 * max(1.0, truth[k][1])]
    assert bad == [] and h.stats()["faults"] == 0


@pytest.mark.parametrize("closed_by", ["step", "detach"])
def test_experts_added_after_a_routers_last_call_of_a_window_lose_no_rows(store_root, closed_by):
    """Lifecycle surgery at a step's end (after the forward) grows router 0 from 4 experts to 7,
    10 (, 13) before any call sees it; the window then closes: at ``h.step()`` (``flush_every=1``),
    or at detach (2 steps, the last left open). The recorder has 4, then 8 (doubled at the call
    with 7), then 16 columns: at a close after the growth to 10 its rows are 8 wide, a count
    never declared. Every routed token must still be stored, and the grown layer declared
    with its new expert count (the new experts at 0 tokens). Truth: own hooks."""
    model = MoE([Router(4), Router(4)])
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append(
            (i, out[2].detach().clone().long(), out[1].detach().clone().double(), True)))
    truth = []
    every, n_steps = (1, 3) if closed_by == "step" else (10, 2)
    with probes.attach(model, run="grow", root=store_root, steps="manual", flush_every=every) as h:
        for step in range(n_steps):
            del calls[:]
            with torch.no_grad():
                model(IDS)
            truth.append(count(calls, 2))
            r = model.routers[0]
            r.n_experts = r.width = r.n_experts + 3
            if step < n_steps - 1 or closed_by == "step":
                h.step()
    assert diff(truth, stored(store_root, "grow")) == []
    stats = h.stats()
    assert stats["rows_dropped"] == 0 and stats["write_errors"] == 0
    declared = chrono.connect(store_root).execute(
        "select max(expert) + 1 from routing where run_id = 'grow' and layer = 0").fetchone()[0]
    assert declared == model.routers[0].n_experts == 4 + 3 * n_steps
