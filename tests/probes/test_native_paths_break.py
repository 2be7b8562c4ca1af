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
