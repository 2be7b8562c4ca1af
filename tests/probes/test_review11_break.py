"""Review 11 (hostile): where a count lands when routing happens outside any top-level forward
the handle saw start, under the forward rule (``steps="auto"`` before training, ``"forward"``).
Every test runs with both counting backends (``tests/probes/conftest.py``). Ground truth: the
test's own forward hooks on the routers (registered before probes attach), counted with NumPy
(``staging_review.count``), one truth step per top-level forward.
"""
from __future__ import annotations

import pytest
import torch

import probes

from .staging_review import IDS, MoE, Router, count, diff, stored, truth_hooks

pytestmark = pytest.mark.usefixtures("backend")

CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


@pytest.mark.parametrize("rule", ["auto", "forward"])
@pytest.mark.parametrize("ctx", list(CONTEXTS))
def test_attach_during_a_forward_makes_its_rest_a_step_of_its_own(store_root, rule, ctx):
    """``probes.attach`` called from a hook inside a running forward (router 0's): the rest of
    that forward (routers 1, 2) is counted, outside any forward the handle saw start; it must
    not be merged into the next forward's step (an inference step is one top-level forward).
    Was: the partial forward and the next forward stored as one step (84 tokens per router at
    step 0 instead of 42), and every later step number one behind the forwards."""
    model = MoE([Router() for _ in range(3)])
    model.eval()
    calls = truth_hooks(model)
    box: dict = {}

    def attach_now(module, args, out):
        if "h" not in box:
            box["h"] = probes.attach(model, run="mid", root=store_root, flush_every=2, steps=rule)

    model.routers[0].register_forward_hook(attach_now)
    truth = []
    for i in range(4):
        del calls[:]
        with CONTEXTS[ctx]():
            model(IDS)
        c = count(calls)
        truth.append({k: v for k, v in c.items() if k[0] != 0} if i == 0 else c)   # router 0 ran before
    box["h"].detach()
    assert sum(t for t, _ in truth[0].values()) == 2 * IDS.numel() * 2
    assert diff(truth, stored(store_root, "mid")) == []
    assert box["h"].stats()["faults"] == 0


@pytest.mark.parametrize("rule", ["auto", "forward"])
def test_a_router_called_by_hand_before_the_first_forward_is_not_merged_into_it(store_root, rule):
    """A router called by hand right after attach, before any forward (a warm-up, a probe of the
    router): its step is not the first forward's; each forward after it is a step of its own."""
    model = MoE([Router() for _ in range(3)])
    calls = truth_hooks(model)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    truth = []
    with probes.attach(model, run="hand", root=store_root, flush_every=3, steps=rule) as h, torch.no_grad():
        model.routers[1](x)
        truth.append(count(calls))
        for _ in range(3):
            del calls[:]
            model(IDS)
            truth.append(count(calls))
    assert diff(truth, stored(store_root, "hand")) == []
    assert h.stats()["faults"] == 0
