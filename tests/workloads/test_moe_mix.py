"""reference_models.moe.mix_experts: the expert mixture the toy MoE LMs share, against a
per-token loop written out in the test."""
from __future__ import annotations

import torch

from reference_models.moe import mix_experts


def test_mixture_equals_the_per_token_sum_and_skips_idle_experts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g)
    idx = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 2], [1, 0], [0, 2]])
    w = torch.rand(7, 2, generator=g)
    scale = torch.tensor([1.0, -2.0, 0.5, 9.0])          # expert e multiplies by scale[e]
    called = []

    def expert(e, rows):
        called.append(e)
        return rows * scale[e]

    out = mix_experts(x, idx, w, expert, 4)
    want = torch.stack([sum(w[t, j] * scale[idx[t, j]] * x[t] for j in range(2)) for t in range(7)])
    assert torch.allclose(out, want, atol=1e-6)
    assert called == [0, 1, 2]                          # expert 3 got no token: never called


def test_gradient_reaches_the_gate_weights():
    x = torch.ones(2, 2)
    w = torch.tensor([[0.25], [0.75]], requires_grad=True)
    mix_experts(x, torch.tensor([[1], [0]]), w, lambda e, rows: rows * (e + 1), 2).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[4.0], [2.0]]))   # d/dw = sum of expert output row
