"""A tiny MoE with native chrono routers whose outputs a test can corrupt on purpose.

The model computes with its real top-k choice; a ``fault`` only changes what the
router *reports* (what probes see), so the training itself stays valid and any
crash would be telemetry's fault. Used by test_model_faults.py and train_child.py.
"""
from __future__ import annotations

import torch
from torch import nn

D = 16


class FaultyRouter(nn.Module):
    chrono_router = True

    def __init__(self, n_experts: int, top_k: int, layer_id: int):
        super().__init__()
        self.n_experts, self.top_k, self.layer_id = n_experts, top_k, layer_id
        self.gate = nn.Linear(D, 8, bias=False)  # room for lifecycle growth up to 8 experts
        self.fault: str | None = None

    def forward(self, x):
        logits = self.gate(x.reshape(-1, D))[:, : self.n_experts]
        weights, idx = logits.softmax(-1).topk(self.top_k, dim=-1)
        rep_logits, rep_w, rep_idx = logits, weights, idx
        self.last = (weights, idx)
        f = self.fault
        if f == "nan_logits":
            rep_logits = logits.detach().clone().fill_(float("nan"))
        elif f == "inf_logits":
            rep_logits = logits.detach().clone().fill_(float("inf"))
        elif f == "nan_weights":
            rep_w = weights.detach().clone().fill_(float("nan"))
        elif f == "index_too_large":
            rep_idx = idx + self.n_experts
        elif f == "index_negative":
            rep_idx = idx - 100
        elif f == "wrong_shapes":
            rep_w, rep_idx = weights[:, :1], idx.reshape(-1)[: max(0, idx.numel() - 1)]
        elif f == "float_indices":
            rep_idx = idx.float() + 0.5
        elif f == "not_a_tuple":
            return None, (weights, idx)
        return rep_logits, rep_w, rep_idx


class TinyMoE(nn.Module):
    def __init__(self, layers: int = 2, n_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.routers = nn.ModuleList(FaultyRouter(n_experts, top_k, i) for i in range(layers))
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(layers))
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = x
        for router, expert in zip(self.routers, self.experts):
            out = router(h)
            weights, _ = router.last
            h = h + expert(h) * weights.sum(-1, keepdim=True).reshape(*h.shape[:-1], 1)
        return self.head(h).squeeze(-1)


def train_steps(model, steps: int, handle=None, batch: int = 8, seed: int = 0, on_step=None) -> list[float]:
    """Plain SGD on a random regression task; returns the losses (all must be finite)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    for s in range(steps):
        if on_step:
            on_step(s)
        x = torch.randn(batch, D, generator=g)
        loss = ((model(x) - x.sum(-1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if handle is not None:
            handle.step()
        losses.append(float(loss.detach()))
    return losses
