"""Review 8 of sampling staged router calls at the flush (1c2b081): the order in which a
layer's calls are sampled. The sampler gives each layer's calls in a step, in order, the
``i``-th random offset word and the ``max_tokens_per_step`` budget first come, first served;
so a staged call sampled at the flush must not lose its place to a later call of the same
layer that is sampled in its hook (counted at once) before that flush.

The model calls each router twice per forward: first on ``M`` "memory" tokens (not the
forward's batch x sequence: no padding mask for it, so it is staged once the router left
probation), then on the forward's tokens under a padding mask (counted at once, sampled in
its hook). Ground truth: the test's own forward hooks (registered before probes attach) clone
each router output; with rate 1 and a budget of exactly ``M`` tokens per layer per step, a
step's rows of a layer are every assignment of that layer's FIRST call of the step (its
memory call), checked with NumPy against the stored rows. Found: with staging on, the second
(at-once) call took the whole budget and the memory call got none; with rate < 1 the two
calls swapped offset words, so rows differed from ``attach(staging=False)``'s.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probes

from .staging_review import D, K, Router

L, M, B, S, VOCAB = 3, 5, 2, 6, 50


class MemoryThenTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.mem = torch.nn.Parameter(torch.randn(M, D))
        self.routers = torch.nn.ModuleList(Router() for _ in range(L))

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).reshape(-1, D)
        for r in self.routers:
            r(self.mem)          # M tokens: staged (no per-token context)
            _, w, idx = r(x)     # B*S tokens under a padding mask: counted at once
            x = x + w.sum(-1, keepdim=True)
        return x.sum()


def _calls(model) -> list:
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append((i, out[2].detach().clone().numpy())))
    return calls


def _run(root, run, staging_on, rate, budget, steps=3):
    model = MemoryThenTokens()
    calls = _calls(model)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -2:] = 0
    per_step = []
    with probes.attach(model, run=run, root=root, tokens=rate, seed=5, steps="manual", flush_every=1,
                       max_tokens_per_step=budget, staging=staging_on) as h:
        for s in range(steps):
            start = len(calls)
            with torch.no_grad():
                for f in range(2):   # two forwards per step: the first of step 0 is probation
                    ids = torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(10 * s + f))
                    model(input_ids=ids, attention_mask=mask)
            per_step.append(calls[start:])
            h.step()
        staged = list(h._window.rec.stage.state)
    rows = chrono.connect(root).execute(
        "SELECT step, layer, batch_idx, position, k, expert FROM tokens WHERE run_id = ? ORDER BY ALL",
        [run]).fetchall()
    return per_step, rows, staged


@pytest.mark.parametrize("staging_on", [False, True])
def test_the_budget_goes_to_a_layers_first_call_of_the_step(store_root, staging_on):
    per_step, rows, states = _run(store_root, f"budget{int(staging_on)}", staging_on, 1.0, M)
    if staging_on:
        assert states == [probes.staging.STAGED] * L   # the memory calls were staged
    got = np.array(rows, dtype=np.int64).reshape(-1, 6)
    for s, calls in enumerate(per_step):
        for layer in range(L):
            first = next(idx for i, idx in calls if i == layer)   # [M, K]: the memory call
            assert first.shape == (M, K)
            want = np.column_stack([np.zeros(M * K, np.int64), np.repeat(np.arange(M), K),
                                    np.tile(np.arange(K), M), first.reshape(-1)])
            have = got[(got[:, 0] == s) & (got[:, 1] == layer)][:, 2:]
            np.testing.assert_array_equal(have, want[np.lexsort(want.T[::-1])], err_msg=f"step {s} layer {layer}")


def test_rows_equal_sampling_at_once_when_a_layer_mixes_staged_and_at_once_calls(store_root):
    _, rows, states = _run(store_root, "mixed", True, 0.4, 4096)
    _, rows_once, _ = _run(store_root, "mixed_once", False, 0.4, 4096)
    assert states == [probes.staging.STAGED] * L
    assert rows and rows == rows_once
