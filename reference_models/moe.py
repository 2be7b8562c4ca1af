"""The expert mixture shared by the toy MoE language models (semantic MoE, VAR's MoE LM and
the governance benchmark's byte-moe): each token's output is the gate-weighted sum of the
outputs of the experts its router chose.

The three models are not one model (attention, router, router input, top-k and init differ,
and the governance benchmark's cached runs pin byte-moe's parameter order), so each keeps its
class; what is the same in all three is this dispatch, and the Switch aux loss
(``chrono.actuators.switch_balance_loss``).
"""
from __future__ import annotations

from typing import Callable

import torch


def mix_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                expert: Callable[[int, torch.Tensor], torch.Tensor], n_experts: int) -> torch.Tensor:
    """``out[t] = Σ_j weights[t, j] · expert(indices[t, j], x[t])``.

    x [N, D] float; indices [N, k] int64 in [0, n_experts); weights [N, k] of x's dtype;
    ``expert(e, rows [n, D]) -> [n, D]`` runs expert e on the rows routed to it. One batched
    call per expert that got tokens (a loop over experts, never over tokens); an expert with
    no token is not called. Returns [N, D] (zeros for a token whose experts all have weight 0).
    """
    out = torch.zeros_like(x)
    for e in range(n_experts):
        tok, slot = (indices == e).nonzero(as_tuple=True)
        if tok.numel():
            out.index_add_(0, tok, expert(e, x[tok]) * weights[tok, slot, None])
    return out
