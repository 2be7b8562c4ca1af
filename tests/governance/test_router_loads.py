"""Router loads for actuators (issue 17 item 7): the probes handle's counts equal a counting hook's.

Ground truth is an independent forward hook that keeps every router call's indices;
the loads a cursor returns must equal the bincount of the calls since its previous take,
for the probes handle (no hook of the actuators) and for ``HookLoads`` (no probes).
"""
import numpy as np
import pytest
import torch
from torch import nn

import chrono
from chrono.governance import Governor
from chrono.router_loads import HookLoads, LoadCursor, RouterLoads

probes = pytest.importorskip("probes")


class DropRouter(nn.Module):
    """Native router that also reports capacity drops (every 5th assignment dropped)."""

    chrono_router = True

    def __init__(self, d=8, n_experts=4, top_k=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.randn(n_experts, d, generator=g))
        self.register_buffer("selection_bias", torch.zeros(n_experts))

    def forward(self, x):
        logits = x @ self.weight.t()
        idx = torch.topk(logits + self.selection_bias, self.top_k, -1).indices
        dropped = (torch.arange(idx.numel()).reshape(idx.shape) % 5) == 0
        return logits, torch.softmax(logits, -1).gather(-1, idx), idx, dropped


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"router": DropRouter(seed=i)}) for i in range(2))

    def forward(self, x):
        return [layer["router"](x)[2] for layer in self.layers]


def _truth(model):
    """Independent record: every call's indices per layer (a plain hook, appended last)."""
    seen = {i: [] for i in range(len(model.layers))}
    for i, layer in enumerate(model.layers):
        layer["router"].register_forward_hook(
            lambda m, a, out, i=i: seen[i].append(out[2].detach().reshape(-1).clone()))
    return seen


def _bincount_since(seen, layer, start, n=4):
    calls = seen[layer][start:]
    if not calls:
        return np.zeros(n, np.float32), len(seen[layer])
    return np.bincount(torch.cat(calls).numpy(), minlength=n).astype(np.float32), len(seen[layer])


def test_handle_cursors_equal_an_independent_count(store_root):
    torch.manual_seed(0)
    model = Net()
    seen = _truth(model)
    with probes.attach(model, run="loads", root=store_root, flush_every=3, steps="manual") as h:
        assert isinstance(h, RouterLoads)
        early = h.load_cursor(1)
        mark = {"early": 0}
        late, mark_late = None, 0
        for step in range(11):                       # windows close at 3, 6, 9 (rows leave the device)
            mode = torch.inference_mode() if step % 4 == 3 else torch.enable_grad()
            with mode:                               # INFER forwards are load too (all modes)
                model(torch.randn(16 + step, 8))
            h.step()
            if step == 4:
                late, mark_late = h.load_cursor(1), len(seen[1])   # counts from its creation on
            if step % 2 == 1:                        # take every other step: spans window closes
                want, mark["early"] = _bincount_since(seen, 1, mark["early"])
                assert isinstance(early, LoadCursor)
                got = early.take()
                assert got.dtype == torch.float32 and got.shape == (4,)
                np.testing.assert_array_equal(got.numpy(), want)
        model(torch.randn(5, 8))                     # the open step counts before it ends
        want, _ = _bincount_since(seen, 1, mark_late)
        np.testing.assert_array_equal(late.take().numpy(), want)
        assert late.take().sum() == 0                # nothing new since: zeros
        with pytest.raises(probes.ProbeError):
            h.load_cursor(7)


def test_hook_loads_and_handle_loads_agree(store_root):
    torch.manual_seed(1)
    model = Net()
    own = HookLoads({i: (l["router"], 4) for i, l in enumerate(model.layers)})
    with probes.attach(model, run="agree", root=store_root, flush_every=2) as h:   # steps="auto"
        pairs = [(own.load_cursor(i), h.load_cursor(i)) for i in (0, 1)]
        for _ in range(7):
            model(torch.randn(12, 8))
            for a, b in pairs:
                x, y = a.take(), b.take()
                assert x.sum() > 0
                assert torch.equal(x, y)
    own.remove()
    assert all(len(l["router"]._forward_hooks) == 0 for l in model.layers)


def _governed_run(store_root, run, probes_loads: bool):
    """A seeded govern() loop with informed-lens + bias; returns decisions and final biases."""
    torch.manual_seed(3)
    model = Net()
    shared = torch.randn(8)
    with probes.attach(model, run=run, root=store_root, flush_every=4) as h:
        if probes_loads:
            gov = chrono.govern(model, h, actuators=("informed-lens", "bias"))
        else:   # the actuators count with their own hook (the path without a probes handle)
            routers = {s.layer: (model.get_submodule(s.name), s.n_experts) for s in h.routers}
            gov = Governor(routers, ("informed-lens", "bias"))
            h.on_snapshot(lambda step, rows, hd: gov.observe(step, rows))
        for _ in range(60):
            model(torch.randn(24, 8) * 0.5 + shared)
            h.step()
            gov.step()
        decisions = [(d.step, d.layer, d.pressure, d.lens_scale) for d in gov.decisions]
        biases = [l["router"].selection_bias.clone() for l in model.layers]
        directions = [acts[0].direction.clone() for acts in gov.actuators.values()]
        gov.remove()
    return decisions, biases, directions


def test_governed_run_is_identical_with_probes_counts_and_with_own_hooks(store_root):
    a = _governed_run(store_root, "own", probes_loads=False)
    b = _governed_run(store_root, "shared", probes_loads=True)
    assert len(a[0]) == 2 * 15
    assert a[0] == b[0]                                            # same decisions, bit for bit
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))      # same bias updates
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))      # same informed directions
    assert any(torch.count_nonzero(x) for x in a[1])               # the bias did move


def test_detach_unwinds_a_governor_registered_with_the_handle(store_root):
    model = Net()
    clean = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    with probes.attach(model, run="unwind", root=store_root, flush_every=2) as h:
        gov = chrono.govern(model, h, actuators=("informed-lens", "bias"))
        model(torch.randn(8, 8))
        h.step()
        gov.step()
        assert len(model.layers[0]["router"]._forward_pre_hooks) == 1     # the informed lens
        assert len(model.layers[0]["router"]._forward_hooks) == 1         # probes only: no counter
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == clean
    assert gov.actuators == {}
