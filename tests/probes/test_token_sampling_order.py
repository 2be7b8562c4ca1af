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
memory call), checked with NumPy against the stored rows. Variants: the second call under a
padding mask; the second call too large to stage (more than ``MAX_CALL`` assignments) under
``inference_mode`` with 8 routers (the first staged as a private copy). Found: with staging on, the second
(at-once) call took the whole budget and the memory call got none; with rate < 1 the two
calls swapped offset words, so rows differed from ``attach(staging=False)``'s.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chrono
import probes

from probes import staging

from .staging_review import D, K, Router

# every test runs with both counting backends (tests/probes/conftest.py)
pytestmark = pytest.mark.usefixtures("backend")

L, M, B, S, VOCAB = 3, 5, 2, 6, 50


BIG = staging.MAX_CALL // K + 3   # tokens of a call too large to stage


class MemoryThenTokens(torch.nn.Module):
    """``variant`` "mask": the second call sees the forward's tokens under a padding mask;
    "large": it sees ``BIG`` tokens (more than ``staging.MAX_CALL`` assignments), no mask;
    both are counted at once. With ``n_routers`` >= 8 the forwards run under
    ``inference_mode`` and the first call is staged as a private copy."""

    def __init__(self, variant="mask", n_routers=L):
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.mem = torch.nn.Parameter(torch.randn(M, D))
        self.routers = torch.nn.ModuleList(Router() for _ in range(n_routers))

    def forward(self, input_ids, attention_mask=None):
        x = self.emb(input_ids).reshape(-1, D)
        for r in self.routers:
            r(self.mem)          # M tokens: staged (no per-token context)
            if self.variant == "large":
                _, w, _ = r(x.repeat(BIG // x.shape[0] + 1, 1)[:BIG])
                w = w[: x.shape[0]]
            else:
                _, w, idx = r(x)     # B*S tokens under a padding mask: counted at once
            x = x + w.sum(-1, keepdim=True)
        return x.sum()


def _calls(model) -> list:
    calls: list = []
    for i, r in enumerate(model.routers):
        r.register_forward_hook(lambda m, a, out, i=i: calls.append((i, out[2].detach().clone().numpy())))
    return calls


def _run(root, run, staging_on, rate, budget, variant="mask", n_routers=L, steps=3):
    """(calls per step from the test's hooks, stored rows, calls sampled at a flush)."""
    model = MemoryThenTokens(variant, n_routers)
    infer = n_routers >= staging.COPIES_MIN_ROUTERS
    calls = _calls(model)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -2:] = 0
    per_step, at_flush = [], []
    with probes.attach(model, run=run, root=root, tokens=rate, seed=5, steps="manual", flush_every=1,
                       max_tokens_per_step=budget, staging=staging_on) as h:
        stage = h._window.rec.stage
        stage._sample = lambda *a, f=stage._sample: at_flush.append(a[3]) or f(*a)   # (mode, indices, weights, layer, ctx)
        for s in range(steps):
            start = len(calls)
            with torch.inference_mode() if infer else torch.no_grad():
                for f in range(2):   # two forwards per step: the first of step 0 is probation
                    ids = torch.randint(1, VOCAB, (B, S), generator=torch.Generator().manual_seed(10 * s + f))
                    model(input_ids=ids, attention_mask=mask if variant == "mask" else None)
            per_step.append(calls[start:])
            h.step()
    rows = chrono.connect(root).execute(
        "SELECT step, layer, batch_idx, position, k, expert FROM tokens WHERE run_id = ? ORDER BY ALL",
        [run]).fetchall()
    return per_step, rows, at_flush


# ("large" with few routers: a router whose probation calls are too large is never staged)
VARIANTS = [("mask", L), ("large", staging.COPIES_MIN_ROUTERS)]


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
@pytest.mark.parametrize("variant, n_routers", VARIANTS)
@pytest.mark.parametrize("staging_on", [False, True])
def test_the_budget_goes_to_a_layers_first_call_of_the_step(store_root, staging_on, variant, n_routers):
    run = f"budget{int(staging_on)}{variant}{n_routers}"
    per_step, rows, at_flush = _run(store_root, run, staging_on, 1.0, M, variant, n_routers)
    if staging_on:   # every router's memory calls were staged, and sampled at a flush
        assert set(at_flush) == set(range(n_routers))
    got = np.array(rows, dtype=np.int64).reshape(-1, 6)
    for s, calls in enumerate(per_step):
        for layer in range(n_routers):
            first = next(idx for i, idx in calls if i == layer)   # [M, K]: the memory call
            assert first.shape == (M, K)
            want = np.column_stack([np.zeros(M * K, np.int64), np.repeat(np.arange(M), K),
                                    np.tile(np.arange(K), M), first.reshape(-1)])
            have = got[(got[:, 0] == s) & (got[:, 1] == layer)][:, 2:]
            np.testing.assert_array_equal(have, want[np.lexsort(want.T[::-1])], err_msg=f"step {s} layer {layer}")


@pytest.mark.torch_ops_only   # checks the PyTorch ops' own buffers / branches
@pytest.mark.parametrize("variant, n_routers", VARIANTS)
def test_rows_equal_sampling_at_once_when_a_layer_mixes_staged_and_at_once_calls(store_root, variant, n_routers):
    run = f"mixed{variant}{n_routers}"
    _, rows, at_flush = _run(store_root, run, True, 0.4, 4096, variant, n_routers)
    _, rows_once, _ = _run(store_root, run + "_once", False, 0.4, 4096, variant, n_routers)
    assert set(at_flush) == set(range(n_routers))
    assert rows and rows == rows_once
