"""The one Switch aux loss (Fedus et al. 2021, eq. 4) against numbers worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from chrono import metrics
from chrono.actuators import switch_aux_loss, switch_balance_loss

# 4 tokens, 2 experts. Top-1 choices 0, 0, 1, 0 -> f = (3/4, 1/4);
# P = column means = ((.5+.9+.2+.6)/4, (.5+.1+.8+.4)/4) = (.55, .45);
# E·Σ f_i·P_i = 2 · (.75·.55 + .25·.45) = 2 · .525 = 1.05
PROBS = [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
TOP1 = [[0], [0], [1], [0]]


def test_hand_computed_value_alpha_and_gradient():
    p = torch.tensor(PROBS, requires_grad=True)
    loss = switch_balance_loss(p, torch.tensor(TOP1), 2)
    assert loss.item() == pytest.approx(1.05, abs=1e-6)
    assert switch_balance_loss(p, torch.tensor(TOP1), 2, alpha=0.05).item() == pytest.approx(0.0525, abs=1e-7)
    loss.backward()   # d/dp[t, i] = E · f_i / T: (2·.75/4, 2·.25/4) = (.375, .125) for every token
    assert torch.allclose(p.grad, torch.tensor([[0.375, 0.125]] * 4))


def test_top2_counts_every_assignment_and_the_extremes():
    # top-2 of 2 experts: every token sends one assignment to each -> f = (.5, .5) -> 2·(.5·.55+.5·.45) = 1
    both = torch.tensor([[0, 1]] * 4)
    assert switch_balance_loss(torch.tensor(PROBS), both, 2).item() == pytest.approx(1.0, abs=1e-6)
    # one expert takes every token with probability 1: E (here 4); uniform: 1
    collapsed = torch.zeros(6, 4)
    collapsed[:, 2] = 1.0
    assert switch_balance_loss(collapsed, torch.full((6, 1), 2), 4).item() == pytest.approx(4.0)
    uniform = torch.full((8, 4), 0.25)
    assert switch_balance_loss(uniform, torch.arange(8).remainder(4)[:, None], 4).item() == pytest.approx(1.0)


def test_logits_form_is_the_softmax_and_agrees_with_the_numpy_metric():
    logits = torch.log(torch.tensor(PROBS))          # softmax(log p) = p (rows sum to 1)
    assert switch_aux_loss(logits, torch.tensor(TOP1), 2).item() == pytest.approx(1.05, abs=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)).astype(np.float32)
    top2 = torch.topk(torch.from_numpy(x), 2, dim=-1).indices
    assert switch_aux_loss(torch.from_numpy(x), top2, 8).item() == \
        pytest.approx(metrics.switch_aux_loss(x, top_k=2), rel=1e-5)


def test_reference_models_train_with_it():
    """VAR's MoE LM reports the same aux loss as the function on its own router output."""
    from reference_models.var.moe_lm import MoEConfig, MoELM

    torch.manual_seed(0)
    lm = MoELM(MoEConfig(d_model=16, n_layers=1, n_heads=2, n_experts=4, d_ff=16, seq_len=8))
    h = torch.randn(1, 8, 16)
    lm.blocks[0].moe(h, None)
    logits, _, idx = lm.blocks[0].moe.router(h.reshape(-1, 16))
    probs = logits.softmax(-1)
    f = torch.bincount(idx[:, 0], minlength=4).float() / 8
    assert lm.blocks[0].moe.last_aux.item() == pytest.approx(4 * (f * probs.mean(0)).sum().item(), rel=1e-6)
