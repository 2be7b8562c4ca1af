"""Semantic MoE language model (the ASTRA-X design), nanoGPT style; the router is in ``router.py``.

A tiny causal transformer over bytes whose feed-forward layers are mixtures of MLP
experts. Each MoE layer routes with a ``SemanticRouter``:

* a MeaningSpace encoder turns the (contextual) router input of each token into a unit
  semantic vector z (frozen random orthogonal projection, so the space does not drift
  under the clustering that reads it);
* a teacher scores experts by the squared distance between z and the expert's cluster
  centroid; centroids come from FAISS spherical k-means over a reservoir of recent z,
  deterministic under a seed, re-fit periodically and matched to the previous centroids
  (Hungarian) so expert identities stay put, and saved / loaded as .npz;
* a student (linear) router is trained with cross-entropy to the teacher's top-1;
* the hybrid mixes teacher and student probabilities, ``(1-alpha)*p_teacher +
  alpha*p_student``, alpha following a schedule, minus a load penalty against experts
  whose running load share exceeds 1/E; top-k of the result, any k <= n_experts.

Experts can be split, cloned, merged, pruned and spawned at run time (the model
implements ``chrono.lifecycle.LifecycleModel``); the router's ``n_experts`` follows.

Routers follow chrono's native router protocol: ``chrono_router = True``, ``n_experts``,
``top_k``, ``layer_id``; ``forward(x [T, d]) -> (logits [T, E], weights [T, k], indices [T, k])``.

``faithful=True`` reproduces the seed as written: centroids start at zero and are never
fitted, the semantic vector is the hidden state itself, the student gets no distillation
signal, selection is a greedy top-1 argmax whose expert output is not weighted by the gate.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe import mix_experts
from .router import SemanticRouter, spherical_kmeans


@dataclass
class SemanticMoEConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 128          # hidden width of one expert
    n_experts: int = 8
    top_k: int = 2
    d_meaning: int = 32      # MeaningSpace dimension
    teacher_tau: float = 0.1  # temperature of teacher scores (distances of unit vectors are in [0, 4])
    load_penalty: float = 1.0  # weight of the overload penalty on log-probabilities
    load_momentum: float = 0.9
    reservoir: int = 8192    # meaning vectors kept per layer for re-clustering
    dense: bool = False      # dense FFN of width top_k * d_ff (equal active parameters)
    faithful: bool = False
    seed: int = 0


PRESETS = {
    # runs in seconds on a laptop CPU; used by the test suite
    "quick": dict(block_size=32, n_layer=1, n_head=2, d_model=32, d_ff=64, n_experts=4, top_k=2,
                  d_meaning=16),
    "small": dict(),
}


class ExpertMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)

    def forward(self, x):  # [N, d] -> [N, d]
        return self.proj(F.gelu(self.fc(x)))


class MoEFFN(nn.Module):
    def __init__(self, cfg: SemanticMoEConfig, layer_id: int):
        super().__init__()
        self.cfg = cfg
        self.router = SemanticRouter(cfg, layer_id)
        self.experts = nn.ModuleList(ExpertMLP(cfg.d_model, cfg.d_ff) for _ in range(cfg.n_experts))

    def forward(self, x, trace: list | None = None):
        B, T, D = x.shape
        flat = x.reshape(B * T, D)                         # [N, D]
        _, w, idx = self.router(flat, trace=trace)         # [N, k], [N, k]
        out = mix_experts(flat, idx, w, lambda e, rows: self.experts[e](rows), len(self.experts))
        return out.reshape(B, T, D)

    # ---- lifecycle surgery; each returns the index holding the result
    def split(self, e: int, seed: int) -> int:
        r = self.router
        z = r.reservoir()
        c = r.centroids[e]
        if z.shape[0]:
            zt = torch.from_numpy(z).to(c.device)
            mine = z[(torch.cdist(zt, r.centroids).argmin(1) == e).cpu().numpy()]
        else:
            mine = z
        if mine.shape[0] >= 8:   # divide the expert's region with 2-means of its own vectors
            two = torch.from_numpy(spherical_kmeans(mine, 2, seed)).to(c.device)
            c_keep, c_new = two[0], two[1]
        else:
            g = torch.Generator().manual_seed(seed)
            d = F.normalize(torch.randn(c.shape, generator=g).to(c.device), dim=0) * 0.1
            c_keep, c_new = F.normalize(c + d, dim=0), F.normalize(c - d, dim=0)
        r.centroids[e] = c_keep
        new = self._copy_expert(e, seed)
        r._resize(list(range(r.n_experts)), [c_new],
                  [(r.student.weight.data[e].clone(), r.student.bias.data[e].clone())])
        r.load_ema[e] *= 0.5
        r.load_ema[-1] = r.load_ema[e]
        self.experts.append(new)
        return r.n_experts - 1

    def clone(self, e: int, seed: int) -> int:
        r = self.router
        g = torch.Generator().manual_seed(seed)
        c = r.centroids[e]
        c_new = F.normalize(c + 0.05 * torch.randn(c.shape, generator=g).to(c.device), dim=0) \
            if c.abs().sum() > 0 else c.clone()
        self.experts.append(self._copy_expert(e, seed))
        r._resize(list(range(r.n_experts)), [c_new],
                  [(r.student.weight.data[e].clone(), r.student.bias.data[e].clone())])
        return r.n_experts - 1

    def spawn(self, seed: int) -> int:
        r = self.router
        z = r.reservoir()
        if z.shape[0]:   # the meaning vector worst served by the current centroids
            zt = torch.from_numpy(z).to(r.centroids.device)
            far = int(torch.cdist(zt, r.centroids).min(1).values.argmax())
            c_new = zt[far]
        else:
            c_new = torch.zeros_like(r.centroids[0])
        with torch.random.fork_rng(devices=[]):   # the new expert's weights depend on seed only
            torch.manual_seed(seed)
            ex = ExpertMLP(self.cfg.d_model, self.cfg.d_ff)
        ex = ex.to(r.centroids.device)
        self.experts.append(ex)
        r._resize(list(range(r.n_experts)), [c_new],
                  [(r.student.weight.data.mean(0), r.student.bias.data.mean(0))])
        return r.n_experts - 1

    def merge(self, a: int, b: int) -> int:
        """Fold expert b into a (load-weighted average of weights, centroid, student row)."""
        r = self.router
        la, lb = float(r.load_ema[a]) + 1e-6, float(r.load_ema[b]) + 1e-6
        wa, wb = la / (la + lb), lb / (la + lb)
        with torch.no_grad():
            for pa, pb in zip(self.experts[a].parameters(), self.experts[b].parameters()):
                pa.mul_(wa).add_(wb * pb)
            r.centroids[a] = F.normalize(wa * r.centroids[a] + wb * r.centroids[b], dim=0) \
                if r.centroids.abs().sum() > 0 else r.centroids[a]
            r.student.weight.data[a] = wa * r.student.weight.data[a] + wb * r.student.weight.data[b]
            r.student.bias.data[a] = wa * r.student.bias.data[a] + wb * r.student.bias.data[b]
            r.load_ema[a] += r.load_ema[b]
        self._remove(b)
        return a if a < b else a - 1

    def prune(self, e: int) -> int:
        self._remove(e)
        return e

    def _remove(self, e: int):
        keep = [i for i in range(self.router.n_experts) if i != e]
        self.experts = nn.ModuleList(self.experts[i] for i in keep)
        self.router._resize(keep, [], [])

    def _copy_expert(self, e: int, seed: int) -> ExpertMLP:
        new = copy.deepcopy(self.experts[e])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # break symmetry so the two copies can diverge
            for p in new.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p.device))
        return new


class DenseFFN(nn.Module):
    def __init__(self, cfg: SemanticMoEConfig):
        super().__init__()
        self.mlp = ExpertMLP(cfg.d_model, cfg.top_k * cfg.d_ff)

    def forward(self, x, trace: list | None = None):
        return self.mlp(x)


# ---------------------------------------------------------------- transformer
class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SemanticMoEConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, cfg: SemanticMoEConfig, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = DenseFFN(cfg) if cfg.dense else MoEFFN(cfg, layer_id)

    def forward(self, x, trace: list | None = None):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x), trace)


class SemanticMoELM(nn.Module):
    """Byte-level LM: tokens [B, T] -> logits [B, T, vocab].

    Weights are drawn from torch's global RNG, which the caller seeds (``train`` calls
    ``set_seed(config.seed)`` first); ``cfg.seed`` seeds the frozen MeaningSpace projections
    and lifecycle surgery through local generators.
    """

    def __init__(self, cfg: SemanticMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as nanoGPT
        nn.init.normal_(self.tok.weight, std=0.02)  # small logits at init (nanoGPT's init)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx, targets=None, trace: list | None = None):
        """idx [B, T] int64 (targets [B, T] optional) -> (logits [B, T, V], loss or None).
        With a list ``trace``, each MoE layer appends its ``RouterTrace`` (layer order)."""
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))   # [B, T, D]
        for blk in self.blocks:
            x = blk(x, trace)
        logits = self.head(self.ln_f(x))                                    # [B, T, V]
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                            targets.reshape(-1))
        return logits, loss

    # ---- helpers
    def moe_layers(self) -> list[MoEFFN]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoEFFN)]

    def routers(self) -> list[SemanticRouter]:
        return [m.router for m in self.moe_layers()]

    def active_params(self) -> int:
        """Parameters one token uses (top_k experts of each MoE layer; all of a dense FFN)."""
        total = sum(p.numel() for p in self.parameters())
        for m in self.moe_layers():
            per = sum(p.numel() for p in m.experts[0].parameters())
            total -= per * (len(m.experts) - m.router.top_k)
        return total

    # ---- chrono.lifecycle.LifecycleModel
    def lifecycle_experts(self) -> dict[int, int]:
        return {m.router.layer_id: m.router.n_experts for m in self.moe_layers()}

    def apply_lifecycle(self, p) -> int | None:
        layer = {m.router.layer_id: m for m in self.moe_layers()}.get(p.layer)
        if layer is None or self.cfg.faithful:
            return None
        seed = self.cfg.seed * 7919 + layer.router.n_experts * 31 + p.layer
        n = layer.router.n_experts
        if p.event == "split" and 0 <= p.expert < n:
            return layer.split(p.expert, seed)
        if p.event == "clone" and 0 <= p.expert < n:
            return layer.clone(p.expert, seed)
        if p.event == "spawn":
            return layer.spawn(seed)
        if p.event == "merge" and p.source_expert is not None and n > 1 \
                and 0 <= p.expert < n and 0 <= p.source_expert < n and p.expert != p.source_expert:
            return layer.merge(p.expert, p.source_expert)
        if p.event == "prune" and n > 1 and 0 <= p.expert < n:
            return layer.prune(p.expert)
        return None
