"""A small byte-level Mixture-of-Experts language model for VAR to route.

Why: VAR must route a real trained MoE on real text. This is a nanoGPT-style
decoder (causal attention + top-1 MoE FFN per layer, Switch-style gate weight
= router probability of the chosen expert, Switch aux loss α·E·Σ f_i·P_i from
Fedus et al. 2021, ``chrono.actuators.switch_aux_loss``) trained on ``pydoc_data`` text in seconds on a CPU.

Each MoE layer's router is its own module following chrono's native router
protocol (``chrono_router = True``; returns logits, weights, indices). A
``route`` callable passed to ``forward`` replaces the router's decision (this is
how VAR plugs in): ``route(layer, hidden [N, D], idx [B, T]) -> (weights [N, 1], indices [N, 1])``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chrono.actuators import switch_aux_loss

from ..moe import mix_experts


@dataclass
class MoEConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_experts: int = 8
    d_ff: int = 128
    seq_len: int = 64
    aux_alpha: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


class Router(nn.Module):
    """Linear router over hidden states; top-1 with the expert's softmax probability as weight."""

    chrono_router = True
    top_k = 1

    def __init__(self, d_model: int, n_experts: int, layer_id: int):
        super().__init__()
        self.n_experts, self.layer_id = n_experts, layer_id
        self.gate = nn.Linear(d_model, n_experts, bias=False)

    def forward(self, h):                                # h [N, D]
        logits = self.gate(h)                            # [N, E]
        probs = logits.float().softmax(-1)
        w, idx = probs.max(-1, keepdim=True)             # [N, 1] each
        return logits, w.to(h.dtype), idx


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_id: int):
        super().__init__()
        E, D, Fd = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.router = Router(D, E, layer_id)
        self.w1 = nn.Parameter(torch.randn(E, D, Fd) * D ** -0.5)
        self.w2 = nn.Parameter(torch.randn(E, Fd, D) * Fd ** -0.5)
        self.layer_id = layer_id
        self.last_aux = torch.zeros(())
        self.last_indices: torch.Tensor | None = None     # [N, 1] experts of the last forward

    def forward(self, x, idx_tokens, route=None):        # x [B, T, D]
        B, T, D = x.shape
        h = x.reshape(-1, D)
        E = self.w1.shape[0]
        if route is None:
            logits, w, ind = self.router(h)
            self.last_aux = switch_aux_loss(logits, ind, E)   # E · Σ_i f_i · P_i, top-1 f
        else:                                            # someone else (VAR) decides; own router not run
            w, ind = route(self.layer_id, h, idx_tokens)
            self.last_aux = torch.zeros((), device=h.device)
        self.last_indices = ind.detach()
        out = mix_experts(h, ind, w, lambda e, rows: F.gelu(rows @ self.w1[e]) @ self.w2[e], E)
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer_id: int):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.moe = MoE(cfg, layer_id)

    def forward(self, x, idx, route=None):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.moe(self.ln2(x), idx, route)


class MoELM(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def routers(self) -> list[Router]:
        return [b.moe.router for b in self.blocks]

    def forward(self, idx, route=None):                  # idx [B, T] -> logits [B, T, V]
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x, idx, route)
        return self.head(self.ln_f(x))

    def loss(self, batch, route=None):
        """(cross-entropy, aux loss) on a ``[B, T+1]`` batch."""
        logits = self(batch[:, :-1], route)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        aux = sum(b.moe.last_aux for b in self.blocks) / len(self.blocks)
        return ce, aux


def train_moe(model: MoELM, data, steps: int, lr: float = 3e-3, on_step=None, progress=False):
    """Train with AdamW; ``data.batch(i)`` gives ``[B, T+1]``. ``on_step(i, ce, model)`` after each step."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    for i in tqdm(range(steps), disable=not progress, desc="moe-lm", unit="step"):
        ce, aux = model.loss(data.batch(i))
        opt.zero_grad(set_to_none=True)
        (ce + model.cfg.aux_alpha * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(i, float(ce.detach()), model)
    return model
